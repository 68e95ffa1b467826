"""The training loop's parts: early stopping and the objectives behind one interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from imgsearch.errors import ConfigError
from imgsearch.train.config import METHODS, ObjectiveConfig, StoppingConfig
from imgsearch.train.loop import EarlyStopping
from imgsearch.train.objectives import (
    OBJECTIVES,
    AttributeClassifiers,
    Batch,
    MoCoV2,
    Objective,
    Parts,
    SimCLR,
    SupCon,
    attribute_loss,
    make_objective,
)
from imgsearch.train.samplers import PKSampler, RandomSampler


def _row(metric: float, std: float = 0.1) -> dict[str, float]:
    return {"val_map_at_r": metric, "val_embedding_std": std}


# --- early stopping -------------------------------------------------------------------------------


def test_early_stopping_keeps_the_best_epoch_and_counts_the_rest() -> None:
    model, head = nn.Linear(2, 2), nn.Linear(2, 2)
    stop = EarlyStopping(StoppingConfig(patience=2, min_delta=0.05))
    assert stop.observe(0, _row(0.10), model, None)  # epoch 0 always counts (no min_delta)
    assert stop.best_head == {} and set(stop.best_state) == {"weight", "bias"}
    kept = stop.best_state["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not stop.observe(1, _row(0.12), model, head)  # better, but by less than min_delta
    assert stop.bad_epochs == 1 and not stop.should_stop(_row(0.12))
    assert torch.equal(stop.best_state["weight"], kept)  # a copy, not the live tensor
    assert stop.observe(2, _row(0.20), model, head)
    assert (
        stop.best_epoch == 2 and stop.bad_epochs == 0 and set(stop.best_head) == {"weight", "bias"}
    )
    assert not stop.observe(3, _row(0.21), model, head)
    assert not stop.observe(4, _row(0.0), model, head)
    assert stop.should_stop(_row(0.0)) and not stop.should_stop(_row(float("nan")))


def test_early_stopping_never_keeps_a_collapsed_epoch_and_without_queries_keeps_the_last() -> None:
    model = nn.Linear(2, 2)
    stop = EarlyStopping(StoppingConfig(patience=0, min_embedding_std=1e-3))
    stop.observe(0, _row(0.1), model, None)
    assert not stop.observe(1, _row(0.9, std=1e-6), model, None)  # collapsed: ties rank by chance
    assert stop.best_epoch == 0 and not stop.should_stop(_row(0.9))  # patience 0: never stops
    nan = EarlyStopping(StoppingConfig())
    for epoch in range(3):
        assert nan.observe(epoch, _row(float("nan")), model, None)
    assert nan.best_epoch == 2


def test_early_stopping_state_round_trips_the_checkpoint_entry() -> None:
    model = nn.Linear(2, 2)
    stop = EarlyStopping(StoppingConfig(patience=3))
    stop.observe(0, _row(0.3), model, model)
    stop.observe(1, _row(0.1), model, model)
    again = EarlyStopping(StoppingConfig(patience=3))
    again.load_state_dict(stop.state_dict(), stop.bad_epochs)
    assert set(stop.state_dict()) == {"epoch", "metric", "state", "head"}
    assert (again.best_epoch, again.best_metric, again.bad_epochs) == (0, 0.3, 1)
    assert not again.observe(2, _row(0.2), model, None) and again.bad_epochs == 2


# --- objectives -----------------------------------------------------------------------------------


class _Views:
    """Embeddings of a fixed random table (no images needed): encode = model over the rows."""

    def __init__(self, model: nn.Module, n: int = 12, dim: int = 8) -> None:
        self.model = model
        self.data = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
        # two attributes of the 12 rows: 3 classes, and 2 classes with two rows unknown (-1)
        self.attribute_codes = {
            "colour": np.arange(n) % 3,
            "size": np.array([0, 1, -1, 0, 1, 1, 0, -1, 1, 0, 0, 1][:n]),
        }

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx] + 0.01 * torch.randn(len(idx), self.data.shape[1])

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model(self.pixels(idx)), dim=1)


def _parts(head_dim: int = 4) -> tuple[Parts, nn.Module]:
    model = nn.Linear(8, 6)
    head = nn.Linear(6, head_dim)
    return Parts(model, head, _Views(model), head_dim, seed=0), model  # type: ignore[arg-type]


def test_the_registry_holds_every_configurable_method() -> None:
    assert set(OBJECTIVES) == set(METHODS)
    parts, _ = _parts()
    for name in METHODS:
        cfg = ObjectiveConfig(method=name, batch_size=8, images_per_item=2, moco_queue_size=16)
        objective = make_objective(name, cfg, parts)
        assert isinstance(objective, Objective)
    with pytest.raises(ConfigError, match="unknown fine-tuning objective"):
        make_objective("byol", ObjectiveConfig(), parts)


def test_each_objective_declares_its_sampler_and_views() -> None:
    parts, _ = _parts()
    cfg = ObjectiveConfig(batch_size=8, images_per_item=2, moco_queue_size=16)
    supcon, simclr = SupCon(cfg, parts), SimCLR(cfg, parts)
    assert supcon.sampler == PKSampler(4, 2) and supcon.views_per_image == 1
    assert simclr.sampler == RandomSampler(8) and simclr.views_per_image == 2
    codes = np.repeat(np.arange(6), 2)
    assert supcon.sampler.steps_per_epoch(codes) == 1 and simclr.sampler.steps_per_epoch(codes) == 1
    batch = Batch(torch.arange(8), torch.from_numpy(codes[:8]))
    for objective in (supcon, simclr):
        loss = objective.loss(batch)
        assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
        loss.backward()
        objective.after_step()  # a no-op hook
        assert objective.state_dict() == {}


def test_moco_keeps_a_queue_and_a_momentum_encoder_across_steps() -> None:
    torch.manual_seed(0)
    parts, model = _parts()
    cfg = ObjectiveConfig(method="moco", batch_size=4, moco_queue_size=8, moco_momentum=0.5)
    moco = MoCoV2(cfg, parts)
    assert moco.views_per_image == 2 and not any(
        p.requires_grad for p in moco.key_model.parameters()
    )
    opt = torch.optim.SGD([*model.parameters(), *parts.head.parameters()], lr=0.5)
    key_before = moco.key_model.weight.clone()
    loss = moco.loss(Batch(torch.arange(4), torch.zeros(4, dtype=torch.long)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    moco.after_step()
    assert int(moco.moco.ptr) == 4  # the batch's keys were enqueued
    moved = moco.key_model.weight
    assert not torch.equal(moved, key_before)  # the key encoder follows the trained one
    assert torch.allclose(moved, 0.5 * key_before + 0.5 * model.weight.detach())
    state = moco.state_dict()
    assert set(state) == {"moco", "key_model", "key_head"}
    again = MoCoV2(cfg, _parts()[0])
    again.load_state_dict(state)
    assert torch.equal(again.moco.queue, moco.moco.queue)
    with pytest.raises(AssertionError, match="after_step before loss"):
        moco.after_step()


# --- multi-task: attribute cross-entropy beside SupCon ----------------------------------------------


def _naive_attribute_loss(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], weights: dict[str, float]
) -> float:
    """Row by row: -log softmax(logits)[target], averaged over the rows with a known target."""
    total = 0.0
    for name, weight in weights.items():
        terms = [
            -math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))
            for row, t in zip(logits[name].tolist(), targets[name].tolist(), strict=True)
            if t >= 0
        ]
        total += weight * (sum(terms) / len(terms) if terms else 0.0)
    return total


def test_attribute_loss_matches_a_row_by_row_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = {"a": torch.randn(6, 3, generator=gen), "b": torch.randn(6, 4, generator=gen)}
    targets = {"a": torch.tensor([0, 2, 1, -1, 0, 2]), "b": torch.tensor([-1, -1, 3, 0, 1, 2])}
    weights = {"a": 1.0, "b": 0.5}
    got = float(attribute_loss(logits, targets, weights))
    assert got == pytest.approx(_naive_attribute_loss(logits, targets, weights), rel=1e-5)
    unknown = {"a": torch.full((6,), -1), "b": torch.full((6,), -1)}
    assert float(attribute_loss(logits, unknown, weights)) == 0.0  # nothing known: no term


def test_cosine_classifier_logits_are_scaled_cosines() -> None:
    clf = AttributeClassifiers(5, {"a": 3}, scale=10.0)
    f = nn.functional.normalize(torch.randn(4, 5), dim=1)
    w = nn.functional.normalize(clf.weights["a"].detach(), dim=1)
    assert torch.allclose(clf(f)["a"], 10.0 * f @ w.T, atol=1e-6)
    assert clf(f)["a"].abs().max() <= 10.0 + 1e-5


def test_supcon_with_attribute_loss_adds_the_terms_and_trains_the_classifiers() -> None:
    parts, model = _parts()
    model.spec = type("Spec", (), {"embedding_dim": 6})()  # the body's width, as Extractor has
    weights = {"colour": 1.0, "size": 0.5}
    base = ObjectiveConfig(batch_size=8, images_per_item=2)
    multi = ObjectiveConfig(batch_size=8, images_per_item=2, attribute_loss=weights)
    plain, mt = SupCon(base, parts), SupCon(multi, parts)
    assert plain.modules() == [] and plain.state_dict() == {}
    assert mt.modules() == [mt.classifiers] and mt.classifiers is not None
    assert {k: tuple(v.shape) for k, v in mt.classifiers.weights.items()} == {
        "colour": (3, 6),
        "size": (2, 6),
    }
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    batch = Batch(idx, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    torch.manual_seed(5)
    plain_loss = plain.loss(batch)
    torch.manual_seed(5)  # the same noisy views for both
    features = parts.views.encode(idx)
    targets = {k: torch.from_numpy(v)[idx] for k, v in parts.views.attribute_codes.items()}
    logits = {k: v.detach() for k, v in mt.classifiers(features).items()}
    expected = float(plain_loss.detach()) + _naive_attribute_loss(logits, targets, weights)
    torch.manual_seed(5)
    loss = mt.loss(batch)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert all(
        w.grad is not None and w.grad.abs().sum() > 0 for w in mt.classifiers.weights.values()
    )
    again = SupCon(multi, parts)
    again.load_state_dict(mt.state_dict())
    assert all(
        torch.equal(again.classifiers.weights[k], w) for k, w in mt.classifiers.weights.items()
    )  # type: ignore[union-attr]


def test_attribute_loss_is_a_supcon_term_only() -> None:
    with pytest.raises(ConfigError, match="term of the supcon objective"):
        ObjectiveConfig(method="simclr", attribute_loss={"category": 1.0})
    with pytest.raises(ConfigError, match="attribute_loss"):
        ObjectiveConfig(attribute_loss={"category": 0.0})
    with pytest.raises(ConfigError, match="must map catalog columns"):
        ObjectiveConfig(attribute_loss=["category"])  # type: ignore[arg-type]
