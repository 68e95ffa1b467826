"""Small heads on top of frozen features: a projection into another embedding space.

:class:`Projection` maps one modality's features into the image embedding space (the text side of
LiT-style alignment: the image side is locked). ``kind="linear"`` is one matrix; ``kind="mlp"``
is Linear -> GELU -> Dropout -> Linear. The output is always L2-normalised, like every embedding
in imgsearch, so cosine similarity is an inner product.

A head is described by a :class:`HeadSpec` (JSON-able) and its ``state_dict``; both are saved
together by :func:`save_head` and read back by :func:`load_head` with
``torch.load(..., weights_only=True)``, so a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.errors import ConfigError

HEAD_KINDS = ("linear", "mlp")
SPEC_FILE = "head.json"
WEIGHTS_FILE = "head.pt"


@dataclass(frozen=True)
class HeadSpec:
    """``kind``: linear | mlp; ``d_in`` -> ``d_out``; ``hidden``/``dropout`` for mlp only."""

    kind: str
    d_in: int
    d_out: int
    hidden: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if min(self.d_in, self.d_out, self.hidden) < 1:
            raise ConfigError(f"head sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout must be in [0, 1), got {self.dropout}")


class Projection(nn.Module):
    """``(N, d_in)`` features -> ``(N, d_out)`` unit vectors."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "linear":
            self.net: nn.Module = nn.Linear(spec.d_in, spec.d_out)
        else:
            self.net = nn.Sequential(
                nn.Linear(spec.d_in, spec.hidden),
                nn.GELU(),
                nn.Dropout(spec.dropout),
                nn.Linear(spec.hidden, spec.d_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def save_head(head: Projection, directory: Path) -> None:
    """Write ``head.json`` (the spec) and ``head.pt`` (the state dict) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(head.spec), sort_keys=True))
    torch.save(
        {k: v.detach().cpu() for k, v in head.state_dict().items()}, directory / WEIGHTS_FILE
    )


def load_head(directory: Path) -> Projection:
    """Read a head written by :func:`save_head` (weights-only: no code is unpickled)."""
    try:
        spec = HeadSpec(**json.loads((directory / SPEC_FILE).read_text()))
    except (OSError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the head spec in {directory}: {exc}") from exc
    head = Projection(spec)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    head.eval()
    return head
