"""What every text tower shares: the :class:`TextTower` protocol, input checks, and the
``tower.json`` a saved tower starts with.

A text tower turns strings into unit-length float32 vectors ``(N, dim)``. A saved tower is a
directory holding ``tower.json`` (``kind``, the tower's parameters and its ``fingerprint``) plus
whatever files that kind needs; :func:`imgsearch.models.text.load_text_tower` reads ``kind`` and
hands the directory to that kind's loader. No saved tower is ever read with pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from imgsearch.errors import ConfigError, ImgsearchError

META_FILE = "tower.json"
#: Bump when a saved tower's layout changes; a loader refuses a format it does not know.
FORMAT_VERSION = 1


class TextInputError(ImgsearchError):
    """Texts handed to a tower are not a sequence of non-empty strings."""


@runtime_checkable
class TextTower(Protocol):
    """A text encoder. ``fit`` is a no-op returning ``self`` for pretrained towers; towers learned
    from the catalog (``ngram``) must be fitted on train texts before :meth:`encode`."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def fit(self, texts: Sequence[str]) -> TextTower: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts`` (N strings) -> ``(N, dim)`` float32, each row L2 = 1 (or all zeros for a
        text the tower knows nothing of, such as an unseen script for ``ngram``)."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex of everything that decides the vectors (params and weights): a text model
        aligned on one fingerprint is refused with another."""
        ...

    def save(self, directory: Path) -> Path: ...


def check_texts(texts: Sequence[str], who: str) -> list[str]:
    """A list of non-empty strings, or :class:`TextInputError` naming the first bad one."""
    if isinstance(texts, str | bytes):
        raise TextInputError(
            f"{who}: expected a sequence of strings, got a single {type(texts).__name__}"
        )
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TextInputError(f"{who}: text {i} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise TextInputError(f"{who}: text {i} is empty or only whitespace")
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32; all-zero rows stay zero (never NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def hash_update_tensors(digest: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Feed a state dict into ``digest`` in sorted key order (name, dtype, shape, raw bytes)."""
    for key, value in sorted(state.items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its raw 16-bit words
            tensor = tensor.view(torch.int16)
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())


def hash_arrays(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 hex of canonical JSON ``params`` and ``arrays`` in sorted name order."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
    for key, value in sorted(arrays.items()):
        arr = np.ascontiguousarray(value)
        digest.update(f"\0{key}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def write_meta(directory: Path, kind: str, params: Mapping[str, Any], fingerprint: str) -> Path:
    """Create ``directory`` and write its ``tower.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "params": dict(params),
        "fingerprint": fingerprint,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    """``tower.json`` of a saved tower, checked for the keys every kind needs."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{directory} is not a saved text tower (no {META_FILE})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    missing = sorted({"kind", "format_version", "params", "fingerprint"} - set(meta))
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {meta['format_version']}, this code reads {FORMAT_VERSION}"
        )
    return dict(meta)
