"""Each loss against a slow, obviously-correct reference (python loops over pairs), plus edge cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from imgsearch.train.losses import MoCo, moco_loss, nt_xent_loss, supcon_loss


def _unit(v: torch.Tensor) -> list[float]:
    norm = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    views = [_unit(v) for v in z1] + [_unit(v) for v in z2]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(_dot(views[i], views[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(_dot(views[i], views[j]) / t) / denom)
    return total / (2 * n)


def ref_supcon(features: torch.Tensor, labels: list[int], t: float) -> float:
    """features (N, V, D): every (image, view) is an anchor; positives share the label."""
    samples = [
        (_unit(features[i, v]), labels[i])
        for v in range(features.shape[1])
        for i in range(features.shape[0])
    ]
    per_anchor = []
    for i, (zi, li) in enumerate(samples):
        positives = [p for p, (_, lp) in enumerate(samples) if p != i and lp == li]
        if not positives:
            continue
        denom = sum(math.exp(_dot(zi, za) / t) for a, (za, _) in enumerate(samples) if a != i)
        per_anchor.append(
            -sum(math.log(math.exp(_dot(zi, samples[p][0]) / t) / denom) for p in positives)
            / len(positives)
        )
    return sum(per_anchor) / len(per_anchor)


def ref_moco(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for qi, ki in zip(q, k, strict=True):
        qu, ku = _unit(qi), _unit(ki)
        pos = math.exp(_dot(qu, ku) / t)
        neg = sum(math.exp(_dot(qu, _unit(nj)) / t) for nj in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- NT-Xent -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_nt_xent_matches_reference(gen: torch.Generator, n: int, d: int, t: float) -> None:
    z1, z2 = (
        torch.randn(n, d, generator=gen, dtype=torch.float64),
        torch.randn(n, d, generator=gen, dtype=torch.float64),
    )
    assert float(nt_xent_loss(z1, z2, t)) == pytest.approx(ref_nt_xent(z1, z2, t), rel=1e-9)


def test_nt_xent_is_lower_when_views_agree(gen: torch.Generator) -> None:
    z = torch.randn(8, 16, generator=gen)
    far = torch.randn(8, 16, generator=gen)
    assert nt_xent_loss(z, z + 0.01 * far, 0.2) < nt_xent_loss(z, far, 0.2)


def test_nt_xent_gradient_flows(gen: torch.Generator) -> None:
    z1 = torch.randn(4, 6, generator=gen, requires_grad=True)
    nt_xent_loss(z1, torch.randn(4, 6, generator=gen)).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_nt_xent_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4))
    for t in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), t)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(3), torch.randn(3))
    same = torch.ones(4, 8, requires_grad=True)
    loss = nt_xent_loss(same, same.detach().clone(), 0.1)
    loss.backward()
    # all similarities equal: each anchor picks its positive among 2N-1 = 7 equals
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)
    assert same.grad is not None and torch.isfinite(same.grad).all()
    zeros = nt_xent_loss(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.isfinite(zeros)


# --- SupCon --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,views,t",
    [
        ([0, 0, 1, 1, 2, 2], 1, 0.1),
        ([0, 1, 0, 2, 1, 3], 2, 0.5),
        ([4, 4, 4, 9], 3, 0.07),
        ([0, 1, 2], 2, 1.0),
    ],
)
def test_supcon_matches_reference(
    gen: torch.Generator, labels: list[int], views: int, t: float
) -> None:
    f = torch.randn(len(labels), views, 5, generator=gen, dtype=torch.float64)
    got = supcon_loss(f if views > 1 else f[:, 0], torch.tensor(labels), t)
    assert float(got) == pytest.approx(ref_supcon(f, labels, t), rel=1e-9)


def test_supcon_without_labels_is_nt_xent_for_two_views(gen: torch.Generator) -> None:
    z1, z2 = (
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
    )
    assert float(supcon_loss(torch.stack([z1, z2], dim=1), None, 0.3)) == pytest.approx(
        float(nt_xent_loss(z1, z2, 0.3)), rel=1e-9
    )


def test_supcon_item_aware_positives_lower_the_loss(gen: torch.Generator) -> None:
    # two images per item, the same item's images close together: low loss with item labels,
    # high when each image is told it is alone (its neighbour becomes a hard negative).
    centres = torch.randn(4, 8, generator=gen)
    f = torch.cat([centres, centres + 0.05 * torch.randn(4, 8, generator=gen)])
    items = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    wrong = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])
    assert supcon_loss(f, items, 0.1) < supcon_loss(f, wrong, 0.1)


def test_supcon_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        supcon_loss(torch.randn(1, 2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        supcon_loss(torch.randn(2, 2, 2, 2), torch.tensor([0, 1]))
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            supcon_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), t)
    same = torch.ones(4, 2, 8, requires_grad=True)
    loss = supcon_loss(same, torch.tensor([0, 0, 1, 1]), 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)  # 8 samples, all equal
    assert same.grad is not None and torch.isfinite(same.grad).all()
    # a labelled anchor without positives is skipped, not NaN
    assert torch.isfinite(supcon_loss(torch.randn(3, 4), torch.tensor([0, 0, 1])))


# --- MoCo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,t", [(1, 5, 0.2), (4, 7, 0.07), (3, 1, 1.0)])
def test_moco_matches_reference(gen: torch.Generator, n: int, k: int, t: float) -> None:
    q, key = (
        torch.randn(n, 6, generator=gen, dtype=torch.float64),
        torch.randn(n, 6, generator=gen, dtype=torch.float64),
    )
    queue = torch.randn(k, 6, generator=gen, dtype=torch.float64)
    assert float(moco_loss(q, key, queue, t)) == pytest.approx(ref_moco(q, key, queue, t), rel=1e-9)


def test_moco_no_gradient_into_keys_or_queue(gen: torch.Generator) -> None:
    q = torch.randn(3, 4, generator=gen, requires_grad=True)
    k = torch.randn(3, 4, generator=gen, requires_grad=True)
    moco_loss(q, k, torch.randn(5, 4, generator=gen)).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_moco_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least one"):
        moco_loss(torch.randn(0, 4), torch.randn(0, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="queue"):
        moco_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        moco_loss(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4))
    for t in (0.0, -0.2, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            moco_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), t)
        with pytest.raises(ValueError, match="temperature"):
            MoCo(4, 8, temperature=t)
    with pytest.raises(ValueError, match="momentum"):
        MoCo(4, 8, momentum=1.0)
    with pytest.raises(ValueError):
        MoCo(4, 0)
    same = torch.ones(3, 4, requires_grad=True)
    loss = moco_loss(same, same.detach(), torch.ones(5, 4), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(6), rel=1e-6)
    assert same.grad is not None and torch.isfinite(same.grad).all()


def test_moco_queue_is_fifo_and_wraps() -> None:
    moco = MoCo(dim=2, queue_size=5, seed=1)
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(5))
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    moco.enqueue(first)
    assert int(moco.ptr) == 3
    assert torch.allclose(moco.queue[:3], torch.nn.functional.normalize(first, dim=1))
    moco.enqueue(
        torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    )  # two fit, the third wraps to 0
    assert int(moco.ptr) == 1
    assert torch.allclose(moco.queue[0], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(moco.queue[3:], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(moco.queue[1:3], torch.nn.functional.normalize(first, dim=1)[1:])
    # state travels in state_dict (for checkpoints)
    clone = MoCo(dim=2, queue_size=5, seed=99)
    clone.load_state_dict(moco.state_dict())
    assert torch.equal(clone.queue, moco.queue) and int(clone.ptr) == 1
    # forward uses the queue
    q = torch.randn(2, 2)
    assert torch.allclose(moco(q, q), moco_loss(q, q, moco.queue, moco.temperature))


def test_moco_momentum_update() -> None:
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(0.5)
    before = [p.clone() for p in target.parameters()]
    MoCo(2, 4, momentum=0.9).momentum_update(online, target)
    for b, p_t, p_o in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(p_t, 0.9 * b + 0.1 * p_o)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
