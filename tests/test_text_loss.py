"""CLIP's symmetric InfoNCE (multi-positive form) against a slow, obviously-correct reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imgsearch.train.losses import ClipLoss, clip_loss
from imgsearch.train.losses.clip import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE


def reference(
    img: torch.Tensor, txt: torch.Tensor, img_items: list[int], txt_items: list[int], scale: float
) -> float:
    """Python loops over anchors and positives; the module doc's formula read literally."""
    img = F.normalize(img.double(), dim=1)
    txt = F.normalize(txt.double(), dim=1)

    def direction(
        a: torch.Tensor, b: torch.Tensor, a_items: list[int], b_items: list[int]
    ) -> float:
        total, anchors = 0.0, 0
        for i in range(a.shape[0]):
            positives = [j for j in range(b.shape[0]) if b_items[j] == a_items[i]]
            if not positives:
                continue
            sims = [scale * float(a[i] @ b[k]) for k in range(b.shape[0])]
            denom = math.log(sum(math.exp(s) for s in sims))
            total += -sum(sims[j] - denom for j in positives) / len(positives)
            anchors += 1
        return total / anchors

    return (
        direction(img, txt, img_items, txt_items) + direction(txt, img, txt_items, img_items)
    ) / 2


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    ("img_items", "txt_items", "log_scale"),
    [
        ([0, 1, 2, 3], [0, 1, 2, 3], INIT_LOGIT_SCALE),  # CLIP's case
        ([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 3], 2.0),  # several images and texts per item
        ([5, 7, 9], [9, 9, 9, 9, 5], 0.5),  # an image with no text (7): a negative only
        ([0, 1], [0, 1, 2, 3, 4], 1.0),  # texts with no image: negatives only
        ([0, 1, 2], [0, 1, 2], 10.0),  # beyond the clamp: scale 100
    ],
)
def test_clip_loss_matches_reference(
    gen: torch.Generator, img_items: list[int], txt_items: list[int], log_scale: float
) -> None:
    img = torch.randn(len(img_items), 8, generator=gen)
    txt = torch.randn(len(txt_items), 8, generator=gen)
    got = clip_loss(img, txt, torch.tensor(img_items), torch.tensor(txt_items), log_scale)
    want = reference(img, txt, img_items, txt_items, math.exp(min(log_scale, MAX_LOGIT_SCALE)))
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_single_positive_is_the_clip_formula(gen: torch.Generator) -> None:
    """Figure 3 of the CLIP paper: logits = I_e @ T_e.T * exp(t); (CE_rows + CE_cols) / 2."""
    n = 6
    img, txt = torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen)
    t = torch.tensor(1.7)
    logits = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T * t.exp()
    labels = torch.arange(n)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got = clip_loss(img, txt, labels, labels.clone(), t)
    assert torch.allclose(got, want, atol=1e-6)


def test_item_ids_need_not_be_contiguous_or_ordered(gen: torch.Generator) -> None:
    img, txt = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    a = clip_loss(img, txt, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    b = clip_loss(img, txt, torch.tensor([90, 17, 4000]), torch.tensor([90, 17, 4000]))
    assert torch.allclose(a, b)


def test_gradient_pulls_positives_together(gen: torch.Generator) -> None:
    """One gradient step on the text embeddings raises positive similarities, lowers the
    hardest negative's, and lowers the loss."""
    img_items, txt_items = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 2])
    img = F.normalize(torch.randn(4, 8, generator=gen), dim=1)
    txt = torch.randn(4, 8, generator=gen, requires_grad=True)
    loss = clip_loss(img, txt, img_items, txt_items, 2.0)
    loss.backward()
    assert txt.grad is not None
    stepped = (txt - 0.5 * txt.grad).detach()
    pos = img_items.unsqueeze(1) == txt_items.unsqueeze(0)

    def sims(t: torch.Tensor) -> torch.Tensor:
        return img @ F.normalize(t, dim=1).T

    before, after = sims(txt.detach()), sims(stepped)
    assert after[pos].mean() > before[pos].mean()
    assert after[~pos].mean() < before[~pos].mean()
    assert clip_loss(img, stepped, img_items, txt_items, 2.0) < loss


def test_learnable_temperature_gets_a_gradient_and_is_clamped(gen: torch.Generator) -> None:
    module = ClipLoss()
    assert module.temperature == pytest.approx(0.07)
    img = torch.randn(4, 8, generator=gen)
    items = torch.arange(4)
    module(img, img.clone(), items, items).backward()  # matched pairs: sharper is better
    grad = module.logit_scale.grad
    assert grad is not None and float(grad) < 0  # gradient descent raises the scale
    with torch.no_grad():
        module.logit_scale.fill_(9.0)
    module.clamp_()
    assert float(module.logit_scale.detach()) == pytest.approx(MAX_LOGIT_SCALE)
    assert module.temperature == pytest.approx(0.01)
    module.logit_scale.grad = None
    module(img, img.clone(), items, items).backward()
    assert float(module.logit_scale.grad) == 0.0  # at the clip, no push beyond it


def test_bad_inputs_raise() -> None:
    x = torch.randn(3, 4)
    items = torch.arange(3)
    with pytest.raises(ValueError, match="share an item"):
        clip_loss(x, x, items, items + 10)
    with pytest.raises(ValueError, match="embedding sizes"):
        clip_loss(x, torch.randn(3, 5), items, items)
    with pytest.raises(ValueError, match="text_items"):
        clip_loss(x, x, items, torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        clip_loss(x, x, items.float(), items)
    with pytest.raises(ValueError, match="finite"):
        clip_loss(x, x, items, items, float("nan"))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        clip_loss(x[0], x, items, items)
