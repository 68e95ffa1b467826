"""MoCo v2: InfoNCE against a queue of negatives, with a momentum-updated key encoder.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020 (arXiv:1911.05722), eq. (1)-(2) and Algorithm 1; Chen, Fan, Girshick, He,
"Improved Baselines with Momentum Contrastive Learning", 2020 (arXiv:2003.04297): MLP head,
temperature 0.2, stronger augmentation (blur), cosine schedule.

For queries ``q`` (the online encoder on one view) and keys ``k`` (the momentum encoder on
another view of the same images), with a queue of ``K`` keys from earlier batches::

    L = -1/N * sum_i log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_{j<K} exp(q_i.queue_j / t)) )

after which the batch's keys replace the oldest entries of the queue, and the key encoder's
parameters move as ``theta_k <- m * theta_k + (1 - m) * theta_q``.

Shuffling BN (the paper's trick against batch-statistics "cheating") needs several devices;
on one device the fine-tuning keeps BatchNorm statistics frozen instead, which closes the same
leak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.train.losses.ntxent import check_temperature


def moco_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """InfoNCE of MoCo: each query's positive is its own key, the negatives are the queue.

    Args:
        q: ``(N, D)`` query projections (gradients flow through these).
        k: ``(N, D)`` key projections of other views of the same images (treated as constants).
        queue: ``(K, D)`` negative keys, ``K >= 1``.
        temperature: ``t > 0`` (MoCo v2 uses 0.2).

    Returns:
        A scalar tensor, the mean over the ``N`` queries. All inputs are L2-normalised here.

    Raises:
        ValueError: shapes are not ``(N, D)``, ``(N, D)``, ``(K, D)``; ``N < 1`` (a batch of one
            is allowed: its negatives come from the queue); ``K < 1``; ``temperature`` is not
            a finite number > 0.
    """
    t = check_temperature(temperature)
    if q.ndim != 2 or k.ndim != 2 or queue.ndim != 2:
        raise ValueError(
            f"q, k, queue must be 2-D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[0] < 1:
        raise ValueError("MoCo needs at least one query")
    if queue.shape[0] < 1 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K >= 1, {q.shape[1]}), got {tuple(queue.shape)}")

    qn = F.normalize(q, dim=1)
    kn = F.normalize(k.detach(), dim=1)
    negatives = F.normalize(queue.detach(), dim=1)
    l_pos = (qn * kn).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = qn @ negatives.T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


class MoCo(nn.Module):
    """The state of MoCo v2 besides the encoders: the queue of keys and the momentum update.

    ``queue`` (``(K, D)``, L2-normalised rows) and ``ptr`` are buffers, so they travel with
    :meth:`state_dict` into a checkpoint. The queue starts as random unit vectors (as in the
    paper's code) drawn from a generator seeded with ``seed``.

    Raises ``ValueError`` when ``dim`` or ``queue_size`` < 1, ``momentum`` is outside [0, 1),
    or ``temperature`` is not a finite number > 0.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(
        self,
        dim: int,
        queue_size: int = 4096,
        momentum: float = 0.999,
        temperature: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim < 1 or queue_size < 1:
            raise ValueError(f"dim and queue_size must be >= 1, got {dim} and {queue_size}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.temperature = check_temperature(temperature)
        self.momentum = float(momentum)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "queue", F.normalize(torch.randn(queue_size, dim, generator=generator), dim=1)
        )
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """:func:`moco_loss` of ``q`` and ``k`` against the current queue (``enqueue`` is separate)."""
        return moco_loss(q, k, self.queue, self.temperature)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Write the ``(N, D)`` keys over the oldest queue entries (wrapping around)."""
        if k.ndim != 2 or k.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be (N, {self.queue.shape[1]}), got {tuple(k.shape)}")
        size = self.queue.shape[0]
        keys = F.normalize(k.detach(), dim=1).to(self.queue.dtype)[-size:]
        idx = (int(self.ptr) + torch.arange(keys.shape[0])) % size
        self.queue[idx] = keys
        self.ptr.fill_((int(self.ptr) + keys.shape[0]) % size)

    @torch.no_grad()
    def momentum_update(self, online: nn.Module, target: nn.Module) -> None:
        """``theta_target <- m * theta_target + (1 - m) * theta_online``; buffers are copied.

        ``online`` and ``target`` must have the same architecture (``target`` is usually a
        ``copy.deepcopy`` of ``online`` with ``requires_grad_(False)``).
        """
        online_params = dict(online.named_parameters())
        for name, param in target.named_parameters():
            param.mul_(self.momentum).add_(online_params[name].detach(), alpha=1.0 - self.momentum)
        online_buffers = dict(online.named_buffers())
        for name, buf in target.named_buffers():
            buf.copy_(online_buffers[name])
