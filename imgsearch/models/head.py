"""After an extractor's body: the projection head fine-tuning trains, and what an extractor
returns from its pooled features (:func:`embed_pooled`, the one place that is computed: the
extractor, the trunk's re-extraction, the feature pass and the int8 extractor all call it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def projection_head(dim: int, dims: Sequence[int]) -> nn.Module:
    """``Linear, BatchNorm1d, ReLU`` for each hidden width, then a ``Linear`` (SimCLR v2 / MoCo v2
    style): the head :mod:`imgsearch.train.finetune` trains, rebuilt here when an extractor keeps it."""
    layers: list[nn.Module] = []
    width = dim
    for hidden in dims[:-1]:
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, dims[-1]))
    return nn.Sequential(*layers)


def embed_pooled(
    pooled: torch.Tensor, head: nn.Module | None, backbone_weight: float = 0.0
) -> torch.Tensor:
    """What an extractor returns from its L2-normalised pooled features ``(N, D)``: the features
    themselves without a head; else the head's output, L2-normalised; with ``backbone_weight`` ``w
    > 0``, ``[sqrt(w) * pooled, sqrt(1 - w) * head output]`` (unit norm, so the cosine of two such
    embeddings is ``w cos(pooled) + (1 - w) cos(head)``: the pretrained-like backbone embedding
    kept beside the fine-tuned head, which forgets less of what the backbone knew about images
    unlike the catalog's; ``benchmarks/bench_forgetting.py``). The one place this is computed."""
    if head is None:
        return pooled
    out = F.normalize(head(pooled).float(), dim=1)
    if backbone_weight:
        w = float(backbone_weight)
        out = torch.cat([math.sqrt(w) * pooled.float(), math.sqrt(1.0 - w) * out], dim=1)
    return out
