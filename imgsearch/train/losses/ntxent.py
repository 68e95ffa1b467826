"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709), eq. (1).

For a batch of ``N`` images seen in two augmented views, each of the ``2N`` views is an anchor:
its positive is the other view of the same image, its negatives are the other ``2N - 2`` views.
With ``s(u, v) = u.v / (|u| |v|)`` and temperature ``t``::

    l(i, j) = -log( exp(s(z_i, z_j) / t) / sum_{k != i} exp(s(z_i, z_k) / t) )
    L = 1/(2N) * sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float; raise ``ValueError`` unless it is finite and > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss over two views of the same ``N`` images.

    Args:
        z1: ``(N, D)`` projections of the first views.
        z2: ``(N, D)`` projections of the second views; row ``i`` of ``z1`` and row ``i`` of ``z2``
            are a positive pair, every other row of either tensor is a negative.
        temperature: ``t > 0`` (SimCLR uses 0.1-0.5).

    Returns:
        A scalar tensor: the mean of ``l(i, j)`` over the ``2N`` anchors. Inputs are
        L2-normalised here (a zero row stays zero and gives a finite loss).

    Raises:
        ValueError: the tensors are not 2-D, their shapes differ, ``N < 2`` (no negative to
            contrast with), or ``temperature`` is not a finite number > 0.
    """
    t = check_temperature(temperature)
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(f"z1 and z2 must be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"NT-Xent needs a batch of at least 2 images (negatives), got {n}")

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / t
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    # -inf on the diagonal drops k == i from the denominator; cross_entropy's logsumexp is stable.
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, targets)
