"""Training objectives behind one interface: a step's images in, a loss out.

An :class:`Objective` owns what its loss needs besides the trained model and head (MoCo: the
momentum key encoder and the queue), says how batches are drawn (``sampler``) and how many
views of each image a step runs (``views_per_image``). The loop calls :meth:`Objective.loss`,
steps the optimizer, then :meth:`Objective.after_step`; it never asks which objective it runs.
Add one by subclassing :class:`Objective` and adding it to :data:`OBJECTIVES`.

- ``supcon`` (Khosla et al. 2020), item-aware: P items x K images per batch; the other images
  of the same item are the positives (:func:`imgsearch.train.losses.supcon_loss`). With
  ``attribute_loss`` (column -> weight) it is multi-task: a cross-entropy term per catalog
  attribute (category, subcategory, ...) on the backbone's pooled features, before the
  projection head, where the attribute heads read them (:class:`AttributeClassifiers`).
- ``simclr`` (Chen et al. 2020): two augmented views per image, NT-Xent; no labels.
- ``moco`` (MoCo v2): queries from the trained encoder, keys from a momentum copy, negatives
  from a queue; no labels.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor
from imgsearch.train.checkpoint import plain_state
from imgsearch.train.config import ObjectiveConfig
from imgsearch.train.losses import MoCo, nt_xent_loss, supcon_loss
from imgsearch.train.samplers import PKSampler, RandomSampler


class Views(Protocol):
    """Where an objective gets its inputs (:class:`imgsearch.train.inputs.TrainInputs`)."""

    attribute_codes: dict[str, np.ndarray]  # column -> train images' class codes (-1: missing)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings of fresh views of train images ``idx`` through the trained model."""
        ...

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Fresh normalised (augmented) views of train images ``idx``."""
        ...


class Sampler(Protocol):
    def batches(self, codes: np.ndarray, generator: torch.Generator) -> list[torch.Tensor]: ...

    def steps_per_epoch(self, codes: np.ndarray) -> int: ...


@dataclass
class Batch:
    """One step: positions of its images in the train set and their item codes."""

    idx: torch.Tensor  # (B,) long
    labels: torch.Tensor  # (B,) long


@dataclass
class Parts:
    """What an objective is built from: the trained model and projection head, the inputs,
    the width of the head's output and the run's seed."""

    model: Extractor
    head: nn.Module
    views: Views
    out_dim: int
    seed: int


class Objective(ABC):
    """``loss(batch)`` on the trained model and head; hooks for what else an objective keeps."""

    views_per_image: ClassVar[int] = 1

    def __init__(self, cfg: ObjectiveConfig, parts: Parts) -> None:
        self.cfg = cfg
        self.head = parts.head
        self.views = parts.views
        self.sampler: Sampler = RandomSampler(cfg.batch_size)

    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one step (a scalar with a graph to the trained parameters)."""

    def after_step(self) -> None:  # noqa: B027 - an optional hook
        """Called after each optimizer step (MoCo: enqueue the keys, momentum update)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps for this objective (merged into the checkpoint's top level)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook
        """Restore what :meth:`state_dict` returned (read from the checkpoint's top level)."""

    def modules(self) -> list[nn.Module]:
        """Modules of the objective's own that the optimizer trains beside the model and head."""
        return []


class AttributeClassifiers(nn.Module):
    """One cosine classifier per attribute on L2-normalised features (NormFace, Wang et al.
    2017): ``logits = scale * normalize(W) @ f``, ``f`` ``(B, D)`` unit vectors, ``W`` ``(C, D)``.
    With unit features a plain linear layer starts with near-zero logits and learns its scale
    slowly at a fine-tuning learning rate; the fixed scale makes the softmax sharp from the start.
    """

    def __init__(self, dim: int, n_classes: dict[str, int], scale: float = 16.0) -> None:
        super().__init__()
        self.scale = scale
        self.weights = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(c, dim) / dim**0.5) for name, c in n_classes.items()}
        )

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, D)`` unit features -> ``{attribute: (B, C_attribute) logits}``."""
        return {
            name: self.scale * features @ F.normalize(w, dim=1).T
            for name, w in self.weights.items()
        }


def attribute_loss(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], weights: dict[str, float]
) -> torch.Tensor:
    """``sum_a weights[a] * CE(logits[a], targets[a])`` over the rows whose target is known
    (``>= 0``); an attribute with no known target in the batch adds nothing."""
    total = next(iter(logits.values())).new_zeros(())
    for name, weight in weights.items():
        known = targets[name] >= 0
        if bool(known.any()):
            total = total + weight * F.cross_entropy(logits[name][known], targets[name][known])
    return total


class SupCon(Objective):
    """Supervised contrastive loss on PK batches: positives are the item's other images; plus,
    with ``attribute_loss``, the attribute cross-entropy terms on the pooled features."""

    def __init__(self, cfg: ObjectiveConfig, parts: Parts) -> None:
        super().__init__(cfg, parts)
        k = cfg.images_per_item
        self.sampler = PKSampler(cfg.batch_size // k, k)
        self.attribute_targets = {
            name: torch.from_numpy(parts.views.attribute_codes[name]) for name in cfg.attribute_loss
        }
        self.classifiers = (
            AttributeClassifiers(
                parts.model.spec.embedding_dim,
                {name: int(c.max()) + 1 for name, c in self.attribute_targets.items()},
            )
            if cfg.attribute_loss
            else None
        )

    def loss(self, batch: Batch) -> torch.Tensor:
        features = self.views.encode(batch.idx)
        loss = supcon_loss(self.head(features), batch.labels, self.cfg.temperature)
        if self.classifiers is None:
            return loss
        targets = {name: t[batch.idx] for name, t in self.attribute_targets.items()}
        return loss + attribute_loss(self.classifiers(features), targets, self.cfg.attribute_loss)

    def modules(self) -> list[nn.Module]:
        return [] if self.classifiers is None else [self.classifiers]

    def state_dict(self) -> dict[str, Any]:
        if self.classifiers is None:
            return {}
        return {"attribute_classifiers": plain_state(self.classifiers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.classifiers is not None:
            self.classifiers.load_state_dict(state["attribute_classifiers"])


class SimCLR(Objective):
    """NT-Xent between two augmented views of each image; the other view is the positive."""

    views_per_image = 2

    def loss(self, batch: Batch) -> torch.Tensor:
        n = len(batch.idx)
        z = self.head(self.views.encode(torch.cat([batch.idx, batch.idx])))
        return nt_xent_loss(z[:n], z[n:], self.cfg.temperature)


class MoCoV2(Objective):
    """InfoNCE of the trained encoder's queries against a momentum key encoder's keys, with a
    queue of earlier keys as negatives."""

    views_per_image = 2

    def __init__(self, cfg: ObjectiveConfig, parts: Parts) -> None:
        super().__init__(cfg, parts)
        self.model = parts.model
        self.key_model = copy.deepcopy(parts.model).requires_grad_(False).eval()
        self.key_head = copy.deepcopy(parts.head).requires_grad_(False)
        self.moco = MoCo(
            parts.out_dim, cfg.moco_queue_size, cfg.moco_momentum, cfg.temperature, seed=parts.seed
        )
        self._keys: torch.Tensor | None = None

    def loss(self, batch: Batch) -> torch.Tensor:
        q = self.head(self.views.encode(batch.idx))
        with torch.no_grad():
            self.key_head.eval()
            self._keys = self.key_head(self.key_model(self.views.pixels(batch.idx)))
        return self.moco(q, self._keys)

    def after_step(self) -> None:
        assert self._keys is not None, "after_step before loss"
        self.moco.enqueue(self._keys)
        self.moco.momentum_update(self.model, self.key_model)
        self.moco.momentum_update(self.head, self.key_head)
        self._keys = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "moco": plain_state(self.moco),
            "key_model": plain_state(self.key_model),
            "key_head": plain_state(self.key_head),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moco.load_state_dict(state["moco"])
        self.key_model.load_state_dict(state["key_model"])
        self.key_head.load_state_dict(state["key_head"])


#: method name -> objective class; ``FinetuneConfig.method`` picks one.
OBJECTIVES: dict[str, Callable[[ObjectiveConfig, Parts], Objective]] = {
    "supcon": SupCon,
    "simclr": SimCLR,
    "moco": MoCoV2,
}


def make_objective(name: str, cfg: ObjectiveConfig, parts: Parts) -> Objective:
    """The objective ``name`` (see :data:`OBJECTIVES`); :class:`ConfigError` for an unknown one."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown fine-tuning objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](cfg, parts)
