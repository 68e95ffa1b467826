"""CLIP's symmetric InfoNCE with a learnable temperature, and item-level positives.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
2021 (arXiv:2103.00020), Figure 3: logits ``s * I @ T^T`` with ``s = exp(logit_scale)`` learned
(initialised at ``1 / 0.07``, clipped so that ``s <= 100``), cross-entropy image -> text and
text -> image, averaged. LiT (Zhai et al., CVPR 2022) trains the text side with this loss against
a locked image tower, which is how imgsearch aligns a text tower to its image embeddings.

Multi-positive form. A batch holds ``N`` images and ``M`` texts, each tagged with its item id;
an image and a text are a positive pair when their item ids are equal (every name, label, tag
and language of an item against every image of it). Each anchor's target is the *uniform
distribution over its positives* (the multi-positive contrastive loss of Tian et al., StableRep,
NeurIPS 2023, which is SupCon's ``L_out``: the mean over positives outside the log), and the
softmax runs over all candidates of the other modality, positives included::

    P(i)     = { j : text_item[j] == image_item[i] }
    L_i2t    = 1/|A_I| * sum_{i in A_I} -1/|P(i)| * sum_{j in P(i)} log softmax_j(s * I_i . T_j)
    L_t2i    = the same with the roles of images and texts swapped
    L        = (L_i2t + L_t2i) / 2

``A_I`` (``A_T``) are the images (texts) with at least one positive; the others still act as
negatives. With one image and one text per item (``image_items == text_items == arange(N)``)
this is exactly CLIP's loss: ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.

Shapes: ``image_emb (N, D)``, ``text_emb (M, D)``, ``image_items (N,)``, ``text_items (M,)``
(integer tensors); embeddings are L2-normalised here. Returns a scalar tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: CLIP clips ``exp(logit_scale)`` at 100 "to prevent scaling the logits by more than 100".
MAX_LOGIT_SCALE = math.log(100.0)
#: CLIP's initial temperature 0.07, as a log scale.
INIT_LOGIT_SCALE = math.log(1.0 / 0.07)


def _check(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_items: torch.Tensor,
    text_items: torch.Tensor,
) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be (N, D) and (M, D), got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: {image_emb.shape[1]} vs {text_emb.shape[1]}")
    if image_emb.shape[0] < 1 or text_emb.shape[0] < 1:
        raise ValueError("the batch needs at least one image and one text")
    for name, items, emb in (
        ("image_items", image_items, image_emb),
        ("text_items", text_items, text_emb),
    ):
        if items.ndim != 1 or items.shape[0] != emb.shape[0]:
            raise ValueError(f"{name} must be ({emb.shape[0]},), got {tuple(items.shape)}")
        if items.dtype.is_floating_point or items.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {items.dtype}")


def _multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over anchors (rows) with >= 1 positive of the CE against the uniform distribution
    over their positives; and how many anchors that was."""
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return (per_anchor[has] / n_pos[has].to(logits.dtype)).sum(), int(has.sum())


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_items: torch.Tensor,
    text_items: torch.Tensor,
    logit_scale: torch.Tensor | float = INIT_LOGIT_SCALE,
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE (see the module doc).

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(M, D)`` text embeddings.
        image_items: ``(N,)`` item id of each image.
        text_items: ``(M,)`` item id of each text.
        logit_scale: log of the logit scale (a learnable scalar tensor, or a float); clamped
            at ``log(100)`` (the gradient stops there, as CLIP's clipping does).

    Raises:
        ValueError: malformed shapes or item ids, a non-finite ``logit_scale``, or no image
            and text sharing an item (the loss would be undefined).
    """
    _check(image_emb, text_emb, image_items, text_items)
    scale_log = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)
    if scale_log.numel() != 1 or not bool(torch.isfinite(scale_log)):
        raise ValueError(f"logit_scale must be one finite number, got {logit_scale!r}")
    scale = scale_log.clamp(max=MAX_LOGIT_SCALE).exp()
    img = F.normalize(image_emb, dim=1)
    txt = F.normalize(text_emb, dim=1)
    logits = scale * img @ txt.T  # (N, M)
    pos = image_items.to(img.device).unsqueeze(1) == text_items.to(img.device).unsqueeze(0)
    if not bool(pos.any()):
        raise ValueError("clip_loss: no image and text in the batch share an item id")
    i2t, n_i = _multi_positive_ce(logits, pos)
    t2i, n_t = _multi_positive_ce(logits.T, pos.T)
    return (i2t / n_i + t2i / n_t) / 2


class ClipLoss(nn.Module):
    """:func:`clip_loss` with its temperature as a parameter (``logit_scale``, log scale,
    initialised at ``log(1/0.07)``); give it to the optimiser with the model's parameters.
    Call :meth:`clamp_` after each optimiser step to keep the stored value in ``[0, log 100]``
    as CLIP does (the forward pass clamps anyway)."""

    def __init__(self, init_logit_scale: float = INIT_LOGIT_SCALE, learnable: bool = True) -> None:
        super().__init__()
        value = torch.tensor(float(init_logit_scale))
        self.logit_scale = nn.Parameter(value, requires_grad=learnable)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        image_items: torch.Tensor,
        text_items: torch.Tensor,
    ) -> torch.Tensor:
        return clip_loss(image_emb, text_emb, image_items, text_items, self.logit_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())
