"""Supervised contrastive loss (SupCon), item-aware.

Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu, Krishnan, "Supervised Contrastive
Learning", NeurIPS 2020 (arXiv:2004.11362), eq. (2), the "L_out" form (the mean over positives
outside the log, which the paper found best).

Every sample ``i`` of the batch (``N`` images, each in ``V`` views, flattened to ``M = N * V``
samples) is an anchor. Its positives ``P(i)`` are all other samples with the same label: the
other views of the same image and, when labels are item ids, every view of the other images of
the same item (another vendor's drawing of the same emoji). Its denominator runs over all
``a != i``::

    L = 1/|A| * sum_{i in A} -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )

where ``A`` is the set of anchors that have at least one positive (an anchor without positives
has an undefined term; it is left out, and still serves as a negative for the others).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgsearch.train.losses.ntxent import check_temperature


def supcon_loss(
    features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon loss (``L_out``) with label-aware positives.

    Args:
        features: ``(N, D)`` (one view per image) or ``(N, V, D)`` (``V`` views per image).
        labels: ``(N,)`` integer labels (item ids); samples with equal labels are positives.
            ``None`` means every image is its own class, which with ``V >= 2`` is SimCLR's
            NT-Xent with all views of an image as positives.
        temperature: ``t > 0`` (the paper uses 0.1).

    Returns:
        A scalar tensor: the mean of the per-anchor losses over anchors with >= 1 positive.
        Features are L2-normalised here.

    Raises:
        ValueError: ``features`` is not 2-D or 3-D; ``N < 2``; ``labels`` is not ``(N,)``;
            no anchor has a positive (all labels distinct with one view each); ``temperature``
            is not a finite number > 0.
    """
    t = check_temperature(temperature)
    if features.ndim == 2:
        features = features.unsqueeze(1)
    if features.ndim != 3:
        raise ValueError(f"features must be (N, D) or (N, V, D), got {tuple(features.shape)}")
    n, views, dim = features.shape
    if n < 2:
        raise ValueError(f"SupCon needs a batch of at least 2 images, got {n}")
    if views < 1:
        raise ValueError("features has no views")
    if labels is None:
        labels = torch.arange(n, device=features.device)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")

    # (N, V, D) -> (V*N, D) view-major, and the labels to match.
    z = F.normalize(features.transpose(0, 1).reshape(views * n, dim), dim=1)
    lab = labels.to(z.device).repeat(views)
    m = z.shape[0]

    logits = (z @ z.T) / t
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

    pos_mask = (lab.unsqueeze(0) == lab.unsqueeze(1)) & ~self_mask
    n_pos = pos_mask.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("SupCon: no anchor has a positive (all labels distinct and one view each)")
    # where(), not multiplication: the diagonal holds -inf and 0 * -inf would be NaN.
    pos_log_prob = torch.where(pos_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos].to(log_prob.dtype)
    return per_anchor.mean()
