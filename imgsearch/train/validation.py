"""Validation during fine-tuning: the ``val`` split embedded and ranked after every epoch.

Each val image queries the other val images, relevant = same item: the protocol (and the one
implementation) of :func:`imgsearch.evaluate.retrieval.retrieval_scores`, with full rankings so
``map`` is exact too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from imgsearch.evaluate import metrics as M
from imgsearch.evaluate.retrieval import retrieval_scores


@torch.no_grad()
def embed(
    encode: Callable[[torch.Tensor], torch.Tensor],
    head: nn.Module,
    data: torch.Tensor,
    batch_size: int,
    dim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``encode`` each batch of ``data`` (images or trunk outputs) -> (embeddings, head outputs)."""
    head.eval()
    embs, heads = [], []
    for start in range(0, len(data), batch_size):
        emb = encode(data[start : start + batch_size])
        embs.append(emb)
        heads.append(head(emb))
    if not embs:
        return np.zeros((0, dim), np.float32), np.zeros((0, 1), np.float32)
    return torch.cat(embs).numpy(), torch.cat(heads).float().numpy()


def val_scores(
    emb: np.ndarray, labels: np.ndarray, max_queries: int | None = None, seed: int = 0
) -> dict[str, float]:
    """``map_at_r``, ``map`` (full ranking), ``recall_at_1`` (top-1 hit rate), ``embedding_std``
    (mean per-dimension std of the L2-normalised embeddings: 0 when they collapse to a point).

    NaN figures when there are fewer than two images or no query has a relevant image.
    """
    x = M.l2_normalise(emb)
    out = {"map_at_r": float("nan"), "map": float("nan"), "recall_at_1": float("nan")}
    out["embedding_std"] = float(np.mean(np.std(x, axis=0))) if len(x) else float("nan")
    if len(x) < 2:
        return out
    # emb, not x: retrieval_scores normalises once itself (normalising twice moves the last bits)
    scores = retrieval_scores(emb, labels, (1,), max_queries, seed, full_ranking=True)
    out.update(map_at_r=scores["map_at_r"], map=scores["map"], recall_at_1=scores["hit_at_1"])
    return out
