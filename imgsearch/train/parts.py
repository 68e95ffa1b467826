"""The trained parts of a fine-tuning run: the model copy, its frozen blocks, the projection
head, the optimizer and its warm-up + cosine schedule."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, backbone_blocks, projection_head
from imgsearch.train.config import OptimConfig, ScheduleConfig

# --- the model and its head -----------------------------------------------------------------------


def extractor_head_dims(head: nn.Module) -> list[int]:
    """The widths of a head built by :func:`imgsearch.models.backbones.projection_head`."""
    return [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]


def split_head(extractor: Extractor) -> tuple[Extractor, nn.Module | None]:
    """``(extractor without its head, a copy of the head)``; ``(extractor, None)`` without one."""
    if extractor.head is None:
        return extractor, None
    linears = [m for m in extractor.head.modules() if isinstance(m, nn.Linear)]
    spec = dataclasses.replace(
        extractor.spec, head=(), embedding_dim=linears[0].in_features, backbone_weight=0.0
    )
    return Extractor(extractor.body, spec), copy.deepcopy(extractor.head)


def attach_head(
    model: Extractor, head: nn.Module, dims: Sequence[int], backbone_weight: float = 0.0
) -> Extractor:
    """``model`` followed by the trained ``head`` (built by :func:`projection_head` with ``dims``):
    an extractor whose spec records the head, so :func:`imgsearch.models.backbones.load_extractor`
    rebuilds it; with ``backbone_weight > 0`` it keeps ``model``'s embedding beside the head's
    (:func:`imgsearch.models.backbones.embed_pooled`)."""
    kept = model.spec.embedding_dim if backbone_weight else 0
    spec = dataclasses.replace(
        model.spec,
        embedding_dim=int(dims[-1]) + kept,
        head=tuple(int(d) for d in dims),
        backbone_weight=float(backbone_weight),
    )
    return Extractor(model.body, spec, head=head.eval()).eval()


def build_head(dim: int, dims: Sequence[int], start: nn.Module | None) -> nn.Module:
    """The projection head (``nn.Identity`` without ``dims``), from ``start``'s weights if given."""
    head = projection_head(dim, dims) if dims else nn.Identity()
    if start is not None:
        head.load_state_dict(start.state_dict())
    return head


def freeze(extractor: Extractor, n_blocks: int) -> list[nn.Module]:
    """Freeze the first ``n_blocks`` blocks; return them (to be kept in eval mode)."""
    if n_blocks == 0:
        return []
    blocks = backbone_blocks(extractor)
    if n_blocks > len(blocks):
        raise ConfigError(
            f"freeze_blocks={n_blocks} but {extractor.spec.name} has {len(blocks)} blocks"
        )
    for block in blocks[:n_blocks]:
        block.requires_grad_(False)
    return blocks[:n_blocks]


def prepare_model(
    extractor: Extractor, method: str, size: int, n_frozen: int
) -> tuple[Extractor, list[nn.Module]]:
    """A trainable copy of ``extractor`` with its spec updated (weights tag, resolution ``size``)
    and its first ``n_frozen`` blocks frozen; returns it and those blocks."""
    model = copy.deepcopy(extractor)
    model.requires_grad_(True)
    spec = extractor.spec
    model.spec = dataclasses.replace(
        spec,
        weights=f"{spec.weights}+{method}",
        preprocess=dataclasses.replace(spec.preprocess, size=size),
    )
    return model, freeze(model, n_frozen)


def set_train_mode(extractor: Extractor, frozen: Iterable[nn.Module], freeze_bn: bool) -> None:
    """Train mode, except the frozen blocks (and every BatchNorm with ``freeze_bn``)."""
    extractor.train()
    for block in frozen:
        block.eval()
    if freeze_bn:
        for module in extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def epoch_bn_stats(head: nn.Module) -> None:
    """Make the head's BatchNorm running statistics the plain average over the coming epoch.

    With the default exponential average (momentum 0.1) an epoch of few steps leaves them near
    their initial (0, 1), and in eval mode the head then maps every input to about its last bias:
    a kept head would return collapsed embeddings after a short (for example incremental) run.
    Training itself uses batch statistics and is unaffected.
    """
    for module in head.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None


# --- optimisation ---------------------------------------------------------------------------------


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D parameters), the usual practice."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over ``warmup_steps``, then cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(
    modules: Sequence[nn.Module],
    optim: OptimConfig,
    schedule: ScheduleConfig,
    steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over ``modules``' trainable parameters and its per-step LR schedule."""
    groups = param_groups(modules, optim.weight_decay)
    optimizer: torch.optim.Optimizer
    if optim.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, nesterov=True)
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, schedule.epochs * steps_per_epoch)
    )
    return optimizer, scheduler
