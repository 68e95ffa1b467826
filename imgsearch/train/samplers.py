"""One epoch of batch indices: PK batches for item-aware objectives, shuffled batches otherwise.

A sampler (:class:`PKSampler`, :class:`RandomSampler`) says how an objective draws its batches
(``batches``) and how many steps an epoch has (``steps_per_epoch``, for the learning-rate
schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pk_batches(codes: np.ndarray, p: int, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of PK batches: every item once, in random order, P items x K images per batch.

    ``codes`` (N,) are the item codes of the images. An item with >= K images gives K distinct
    ones at random; one with fewer gives all of them plus random repeats. The last batch is
    dropped when it has fewer than P items (unless it is the only one).
    """
    codes = np.asarray(codes)
    members = [torch.from_numpy(np.flatnonzero(codes == c)) for c in np.unique(codes)]
    order = torch.randperm(len(members), generator=generator).tolist()
    p = min(p, len(members))
    batches = []
    for start in range(0, len(order) - p + 1, p):
        picks = []
        for item in order[start : start + p]:
            m = members[item]
            if len(m) >= k:
                picks.append(m[torch.randperm(len(m), generator=generator)[:k]])
            else:
                extra = m[torch.randint(len(m), (k - len(m),), generator=generator)]
                picks.append(torch.cat([m, extra]))
        batches.append(torch.cat(picks))
    return batches


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches of ``batch_size`` images (the last partial batch dropped)."""
    perm = torch.randperm(n, generator=generator)
    size = min(batch_size, n)
    return [perm[i : i + size] for i in range(0, n - size + 1, size)]


@dataclass(frozen=True)
class PKSampler:
    """P items x K images per batch (:func:`pk_batches`), for item-aware objectives."""

    p: int
    k: int

    def batches(self, codes: np.ndarray, generator: torch.Generator) -> list[torch.Tensor]:
        return pk_batches(codes, self.p, self.k, generator)

    def steps_per_epoch(self, codes: np.ndarray) -> int:
        n_items = len(np.unique(codes))
        return max(1, n_items // min(n_items, self.p))


@dataclass(frozen=True)
class RandomSampler:
    """Shuffled batches of ``batch_size`` images (:func:`random_batches`)."""

    batch_size: int

    def batches(self, codes: np.ndarray, generator: torch.Generator) -> list[torch.Tensor]:
        return random_batches(len(codes), self.batch_size, generator)

    def steps_per_epoch(self, codes: np.ndarray) -> int:
        return max(1, len(codes) // min(self.batch_size, len(codes)))
