"""Attribute heads (issue 13 section 1): heads, scores, style features, the step, the registry."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.embed.attributes_query import AttributePredictor
from imgsearch.embed.files import save_embeddings
from imgsearch.embed.style import gram_stats, image_features
from imgsearch.errors import ConfigError, ExtractorMismatchError
from imgsearch.evaluate.classification import (
    classification_scores,
    knn_scores,
    majority_scores,
    top_k_accuracy,
)
from imgsearch.models.attribute_heads import (
    AttributeHead,
    HeadConfig,
    UntrustedModelError,
    _estimator,
    _fits,
    load_heads,
    save_heads,
)
from imgsearch.models.backbones import create_extractor, fingerprint, save_extractor
from imgsearch.train.attributes import AttributesConfig, train_attributes
from steps.artifacts import local_artifact


def synthetic_catalog(
    n_items: int = 150, per_item: int = 3, n_classes: int = 6, dim: int = 24, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """Items of imbalanced classes (class 0 holds about half), split by item 70/10/20; each
    image is its class centre plus its item's offset plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 1.2
    rows, feats = [], []
    for i in range(n_items):
        cls = 0 if rng.random() < 0.5 else int(rng.integers(1, n_classes))
        split = "train" if i % 10 < 7 else ("val" if i % 10 == 7 else "test")
        offset = rng.normal(scale=0.6, size=dim)
        for j in range(per_item):
            feats.append(centres[cls] + offset + rng.normal(scale=0.8, size=dim))
            rows.append(
                {"image_id": f"{i}/{j}", "item_id": str(i), "kind": f"k{cls}", "split": split}
            )
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_heads_beat_the_majority_baseline_on_test_items(model: str) -> None:
    manifest, x = synthetic_catalog()
    cfg = AttributesConfig(
        attributes={"kind": {"features": ["embedding"]}},
        model=model,
        c_grid=(0.1, 1.0),
        hidden=(32,),
        max_iter=300,
    )
    result = train_attributes(manifest["image_id"], {"embedding": x}, manifest, cfg)
    m = result.metrics
    assert m["kind_acc_at_1"] > m["kind_majority_acc_at_1"] + 0.2
    assert m["kind_acc_at_3"] >= m["kind_acc_at_1"]
    assert m["kind_macro_f1"] > m["kind_majority_macro_f1"]
    assert m["kind_n"] == (manifest["split"] == "test").sum()
    assert m["kind_train_imbalance"] > 2
    assert m["kind_c"] in (0.1, 1.0)
    preds = result.reports["kind"].predictions
    assert set(preds["image_id"]) == set(manifest.loc[manifest["split"] == "test", "image_id"])
    assert (preds["proba_1"] >= preds["proba_2"]).all()


def test_c_is_chosen_on_val_not_train() -> None:
    manifest, x = synthetic_catalog(seed=1)
    tr, va = (manifest["split"] == s for s in ("train", "val"))
    head = AttributeHead("kind", HeadConfig("kind", c_grid=(1e-4, 1.0))).fit(
        x[tr], manifest["kind"][tr], x[va], manifest["kind"][va]
    )
    assert set(head.val_accuracy_) == {1e-4, 1.0}
    assert head.c_ == max(head.val_accuracy_, key=lambda c: (head.val_accuracy_[c], -c))


def test_class_weighting_is_chosen_on_val_and_saved(tmp_path: Path) -> None:
    manifest, x = synthetic_catalog(seed=2)
    tr, va = (manifest["split"] == s for s in ("train", "val"))
    cfg = HeadConfig("kind", c_grid=(0.1, 1.0), class_weights=("balanced", "none"))
    head = AttributeHead("kind", cfg).fit(x[tr], manifest["kind"][tr], x[va], manifest["kind"][va])
    assert head.class_weight_ in ("balanced", "none") and head.c_ in (0.1, 1.0)
    scores = {}
    for c in (0.1, 1.0):
        for w in ("balanced", "none"):
            fitted = _estimator(cfg, c, w).fit(x[tr], manifest["kind"][tr].astype(str))
            scores[(c, w)] = (fitted.predict(x[va]) == manifest["kind"][va].to_numpy()).mean()
    assert scores[(head.c_, head.class_weight_)] == max(scores.values())
    assert head.val_accuracy_ == {
        c: max(scores[(c, "balanced")], scores[(c, "none")]) for c in (0.1, 1.0)
    }
    loaded, _ = load_heads(save_heads({"kind": head}, tmp_path / "h", {}))
    assert loaded["kind"].class_weight_ == head.class_weight_
    with pytest.raises(ConfigError, match="class_weights"):
        HeadConfig("a", class_weights=("inverse",))


def test_the_warm_started_c_path_fits_what_cold_fits_do() -> None:
    """The linear head walks each weighting's C path from the previous solution: against a cold
    fit of every setting (the obvious reference), the same probabilities and predictions."""
    manifest, x = synthetic_catalog(seed=3, dim=40)
    tr, te = (manifest["split"] == s for s in ("train", "test"))
    y = manifest["kind"][tr].astype(str).to_numpy()
    cfg = HeadConfig("kind", c_grid=(0.01, 0.1, 1.0, 10.0), class_weights=("balanced", "none"))
    grid = AttributeHead("kind", cfg)._settings(int(tr.sum()))
    warm = list(_fits(cfg, grid, x[tr], y))
    assert [(c, w) for c, w, _ in warm] == grid

    def objective(pipe: Any, weight: str) -> float:
        """What LogisticRegression minimises: C * sum of weighted log-losses + |W|^2 / 2."""
        model = pipe[-1]
        proba = pipe.predict_proba(x[tr])
        rows = np.searchsorted(model.classes_, y)
        w = np.ones(len(y))
        if weight == "balanced":
            counts = pd.Series(y).value_counts()
            w = np.asarray([len(y) / (len(counts) * counts[v]) for v in y])
        loss = -(w * np.log(proba[np.arange(len(y)), rows])).sum()
        return float(model.C * loss + 0.5 * (model.coef_**2).sum())

    for c, weight, fitted in warm:
        cold = _estimator(cfg, c, weight).fit(x[tr], y)
        assert fitted[-1].C == c and not fitted[-1].warm_start
        # at least as near the optimum as a cold start (lbfgs stops at its tolerance)
        assert objective(fitted, weight) <= objective(cold, weight) * (1 + 1e-3)
        np.testing.assert_allclose(
            fitted.predict_proba(x[te]), cold.predict_proba(x[te]), atol=0.05
        )
        assert (fitted.predict(x[te]) == cold.predict(x[te])).mean() >= 0.98
    assert warm[0][2] is not warm[2][2] and warm[0][2][-1] is not warm[2][2][-1]


def test_knn_head_chooses_k_on_val_and_round_trips(tmp_path: Path) -> None:
    manifest, x = synthetic_catalog(seed=4)
    cfg = AttributesConfig(
        attributes={"kind": {"features": ["embedding"], "model": "knn"}}, k_grid=(3, 15)
    )
    result = train_attributes(manifest["image_id"], {"embedding": x}, manifest, cfg)
    m = result.metrics
    assert m["kind_c"] in (3.0, 15.0)  # the chosen k
    assert m["kind_acc_at_1"] > m["kind_majority_acc_at_1"] + 0.2
    head = result.heads["kind"]
    loaded, _ = load_heads(save_heads(result.heads, tmp_path / "h", {}))
    np.testing.assert_allclose(loaded["kind"].predict_proba(x[:5]), head.predict_proba(x[:5]))
    with pytest.raises(ConfigError, match="k_grid"):
        HeadConfig("a", model="knn", k_grid=(0,))


def naive_top_k(y: list[str], scores: np.ndarray, classes: list[str], k: int) -> float:
    hits = 0
    for row, label in zip(scores, y, strict=True):
        ranked = sorted(range(len(classes)), key=lambda j: -row[j])[:k]
        hits += label in [classes[j] for j in ranked]
    return hits / len(y)


def test_top_k_accuracy_matches_a_naive_reference_and_counts_unseen_labels_as_misses() -> None:
    rng = np.random.default_rng(3)
    classes = [f"c{i}" for i in range(7)]
    scores = rng.random((200, 7))
    y = [classes[i] for i in rng.integers(0, 7, 200)]
    y[:10] = ["never_in_train"] * 10
    y[10:15] = ["a_unseen_label_sorting_first"] * 5
    classes = classes[::-1]  # any column order
    for k in (1, 3, 5):
        assert top_k_accuracy(y, scores, classes, k) == pytest.approx(
            naive_top_k(y, scores, classes, k)
        )
    metrics, per_class, confusion, labels = classification_scores(y, scores, classes)
    assert metrics["n_unseen"] == 15
    assert per_class.set_index("label").at["never_in_train", "recall"] == 0.0
    assert confusion.sum() == 200 and len(labels) == confusion.shape[0]


def test_baselines() -> None:
    scores, classes = majority_scores(["a", "b", "b", "c", "b"], 4)
    assert classes == ["a", "b", "c"] and (scores.argmax(axis=1) == 1).all()
    x_train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    knn, classes = knn_scores(x_train, ["x", "x", "y", "y"], np.array([[1.0, 0.05]]), k=2)
    assert classes[int(knn.argmax())] == "x"


def test_bad_configs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="head model"):
        HeadConfig("a", model="forest")
    with pytest.raises(ConfigError, match="features"):
        HeadConfig("a", features=("colour",))
    manifest, x = synthetic_catalog(n_items=20)
    cfg = AttributesConfig(attributes={"missing": {"features": ["embedding"]}})
    with pytest.raises(ConfigError, match="not in the manifest"):
        train_attributes(manifest["image_id"], {"embedding": x}, manifest, cfg)
    cfg = AttributesConfig(attributes={"kind": {"features": ["gram"]}})
    with pytest.raises(ConfigError, match="not computed"):
        train_attributes(manifest["image_id"], {"embedding": x}, manifest, cfg)


def naive_gram(fmap: np.ndarray) -> np.ndarray:
    c = fmap.shape[0]
    flat = fmap.reshape(c, -1).astype(np.float64)
    gram = [
        sum(flat[a, p] * flat[b, p] for p in range(flat.shape[1])) / flat.shape[1]
        for a in range(c)
        for b in range(a, c)
    ]
    out = np.array([*gram, *flat.mean(axis=1), *flat.std(axis=1, ddof=1)])
    return np.sign(out) * np.sqrt(np.abs(out))


def test_gram_stats_match_a_naive_reference() -> None:
    fmap = torch.randn(2, 3, 4, 5)
    got = gram_stats(fmap).numpy()
    assert got.shape == (2, 3 * 4 // 2 + 6)
    for i in range(2):
        np.testing.assert_allclose(got[i], naive_gram(fmap[i].numpy()), rtol=1e-4, atol=1e-5)


def tiny_extractor() -> torch.nn.Module:
    """A random-init MobileNetV2 that reads 64-px images (fast enough for tests)."""
    torch.manual_seed(0)
    ext = create_extractor("mobilenet_v2", "none")
    spec = ext.spec
    ext.spec = dataclasses.replace(
        spec,
        preprocess=PreprocessConfig(size=64, mean=spec.preprocess.mean, std=spec.preprocess.std),
    )
    return ext.eval()


def drawing(shape: int, vendor: int, seed: int) -> Image.Image:
    """Shape ``shape`` (the emoji), drawn in ``vendor``'s style: flat fill or striped texture."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = 14 + int(rng.integers(0, 6))
    cx, cy = 32 + int(rng.integers(-4, 5)), 32 + int(rng.integers(-4, 5))
    pts = [
        (cx + r * np.cos(2 * np.pi * k / (3 + shape)), cy + r * np.sin(2 * np.pi * k / (3 + shape)))
        for k in range(3 + shape)
    ]
    draw.polygon(pts, fill=(200, 60, 40) if vendor == 0 else (40, 90, 200))
    if vendor == 1:  # this vendor draws with a fine hatch
        for x in range(0, 64, 3):
            draw.line([(x, 0), (x, 63)], fill=(0, 0, 0), width=1)
    return img


def test_image_features_are_one_pass_and_have_the_declared_shapes() -> None:
    ext = tiny_extractor()
    feats = image_features(
        ext, [drawing(0, 0, 1), drawing(1, 1, 2)], ["embedding", "pooled", "gram"], (3, 6)
    )
    assert feats["embedding"].shape == (2, ext.spec.embedding_dim)
    np.testing.assert_allclose(feats["pooled"], feats["embedding"], atol=1e-6)  # no head
    assert feats["gram"].shape == (2, 24 * 25 // 2 + 48 + 32 * 33 // 2 + 64)
    with pytest.raises(ConfigError, match="gram_blocks"):
        image_features(ext, [drawing(0, 0, 1)], ["gram"], (99,))


def test_gram_alone_stops_after_its_last_block_with_the_same_numbers() -> None:
    """Gram statistics without the embedding skip the blocks after the last Gram block; the
    statistics are those of the full pass."""
    from imgsearch.models.backbones import backbone_blocks

    ext = tiny_extractor()
    images = [drawing(0, 0, 1), drawing(2, 1, 2)]
    full = image_features(ext, images, ["embedding", "gram"], (3, 6))
    calls: list[int] = []
    last = backbone_blocks(ext)[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = image_features(ext, images, ["gram"], (6, 3))  # any order
        assert not calls  # the last block never ran
        image_features(ext, images, ["pooled", "gram"], (3,))
        assert calls == [1]  # with pooled features it does
    finally:
        last.remove()
    assert set(alone) == {"gram"}
    width_6 = 32 * 33 // 2 + 64
    np.testing.assert_allclose(alone["gram"][:, :width_6], full["gram"][:, -width_6:], atol=1e-5)
    np.testing.assert_allclose(alone["gram"][:, width_6:], full["gram"][:, :-width_6], atol=1e-5)


def test_saved_heads_round_trip_and_an_untrusted_file_is_refused(tmp_path: Path) -> None:
    manifest, x = synthetic_catalog(n_items=40)
    tr = (manifest["split"] == "train").to_numpy()
    head = AttributeHead("kind", HeadConfig("kind")).fit(x[tr], manifest["kind"][tr])
    save_heads({"kind": head}, tmp_path / "h", {"extractor_fingerprint": "abc"})
    heads, meta = load_heads(tmp_path / "h")
    np.testing.assert_allclose(heads["kind"].predict_proba(x[:5]), head.predict_proba(x[:5]))
    assert meta["extractor_fingerprint"] == "abc"
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(FunctionTransformer(os.system), tmp_path / "h" / "kind.skops")
    with pytest.raises(UntrustedModelError, match="system"):
        load_heads(tmp_path / "h")


def two_vendor_catalog(folder: Path, n_items: int = 40) -> tuple[pd.DataFrame, list[Image.Image]]:
    """Two vendors' drawings of ``n_items`` items (split by item) as PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, images = [], []
    for i in range(n_items):
        split = "train" if i % 10 < 6 else ("val" if i % 10 < 8 else "test")
        for v in (0, 1):
            path = folder / f"{i}_{v}.png"
            img = drawing(i % 3, v, 100 * i + v)
            img.save(path)
            images.append(img)
            rows.append(
                {
                    "image_id": f"v{v}/{i}",
                    "item_id": str(i),
                    "path": str(path),
                    "category": f"shape{i % 3}",
                    "vendor": f"vendor{v}",
                    "split": split,
                }
            )
    return pd.DataFrame(rows), images


def style_store(tmp_path: Path) -> tuple[str, str, torch.nn.Module]:
    """An extract run (embeddings, extractor, manifest) and a split run of 40 two-vendor items."""
    ext = tiny_extractor()
    manifest, images = two_vendor_catalog(tmp_path / "pics")
    emb = image_features(ext, images, ["embedding"])["embedding"]
    fp = fingerprint(ext)
    with mlflow.start_run(run_name="extract") as ex:
        save_embeddings(
            tmp_path / "embeddings.parquet",
            manifest["image_id"],
            emb,
            metadata={"extractor_fingerprint": fp},
        )
        mlflow.log_artifact(str(tmp_path / "embeddings.parquet"))
        mlflow.log_artifacts(str(save_extractor(ext, tmp_path / "extractor")), "extractor")
        manifest.drop(columns="split").to_parquet(tmp_path / "manifest.parquet")
        mlflow.log_artifact(str(tmp_path / "manifest.parquet"))
    with mlflow.start_run(run_name="split") as sp:
        split_dir = tmp_path / "split"
        split_dir.mkdir()
        manifest.to_parquet(split_dir / "manifest.parquet")
        mlflow.log_artifact(str(split_dir / "manifest.parquet"))
    return ex.info.run_id, sp.info.run_id, ext


STEP_OVERRIDES = {
    "attributes.attributes": {
        "category": {"features": ["embedding"]},
        "vendor": {"features": ["gram"]},
    },
    "attributes.gram_blocks": [3],
    "attributes.batch_size": 16,
}


def run_step(tmp_path: Path) -> tuple[str, Path, torch.nn.Module]:
    """The attributes step on :func:`style_store`: ``(run id, its artifacts, the extractor)``."""
    from steps import attributes as step

    extract_id, split_id, ext = style_store(tmp_path)
    run_id = step.run(extract_id, split_id, overrides=STEP_OVERRIDES)
    return run_id, local_artifact(f"runs:/{run_id}"), ext


def test_step_runs_on_a_tiny_store_and_its_heads_refuse_another_extractor(
    mlflow_store: str, tmp_path: Path
) -> None:
    run_id, local, ext = run_step(tmp_path)
    m = mlflow.get_run(run_id).data.metrics
    registered = mlflow.get_run(run_id).data.tags["imgsearch.attributes.registered"]
    assert registered.startswith("no: no registered imgsearch-extractor version"), registered
    for name in ("category", "vendor"):
        for key in ("acc_at_1", "acc_at_3", "macro_f1", "majority_acc_at_1", "knn_acc_at_1"):
            assert f"{name}_{key}" in m
        assert m[f"{name}_n"] == 16  # 8 test items x 2 vendors
    assert m["vendor_acc_at_1"] >= 0.9 > m["vendor_majority_acc_at_1"]
    summary = pd.read_csv(local / "summary.csv")
    assert list(summary["attribute"]) == ["category", "vendor"]
    assert summary.set_index("attribute").at["vendor", "features"] == "gram"
    for name in ("category", "vendor"):
        assert (local / "plots" / f"confusion_{name}.png").stat().st_size > 0
        assert (local / "per_class" / f"{name}.csv").exists()
        assert len(pd.read_parquet(local / "predictions" / f"{name}.parquet")) == 16
    predictor = AttributePredictor.load(local / "attributes", ext)
    out = predictor.predict([drawing(1, 1, 7)])
    assert set(out["attribute"]) == {"category", "vendor"}
    assert out.groupby("attribute")["probability"].sum().le(1.0 + 1e-6).all()
    other = create_extractor("mobilenet_v2", "none")
    with pytest.raises(ExtractorMismatchError, match="re-run the attributes step"):
        AttributePredictor.load(local / "attributes", other)


@pytest.mark.slow
def test_registered_attributes_model_is_checksummed_and_refuses_another_extractor(
    mlflow_store: str, tmp_path: Path
) -> None:
    run_id, local, ext = run_step(tmp_path)
    from registry.attributes_model import ATTRIBUTES_MODEL, log_attributes_model
    from registry.integrity import load_verified
    from registry.tags import TAG_EXTRACTOR_VERSION, TAG_FINGERPRINT

    bad_version = SimpleNamespace(version="7", tags={TAG_FINGERPRINT: "0" * 64})
    with mlflow.start_run(run_name="register"):
        with pytest.raises(ExtractorMismatchError):
            log_attributes_model(
                local / "attributes",
                tmp_path / "extractor",
                extractor_version=bad_version,
                source_run_id=run_id,
            )  # type: ignore[arg-type]
        good = SimpleNamespace(version="3", tags={TAG_FINGERPRINT: fingerprint(ext)})
        version = log_attributes_model(
            local / "attributes",
            tmp_path / "extractor",
            extractor_version=good,
            source_run_id=run_id,
            alias="champion",
        )  # type: ignore[arg-type]
    assert version.tags[TAG_EXTRACTOR_VERSION] == "3"
    assert any(k.startswith("sha256.attributes/") for k in version.tags)
    model = load_verified(f"models:/{ATTRIBUTES_MODEL}@champion")
    buf = io.BytesIO()
    drawing(2, 0, 5).save(buf, format="PNG")
    answer = model.predict(
        pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode(), "not an image"]})
    )
    assert set(answer.loc[answer["query"] == 0, "attribute"]) == {"category", "vendor"}
    assert answer.loc[answer["query"] == 1, "error"].notna().all()


def test_the_step_registers_heads_on_the_champion_extractor_and_search_predicts_with_them(
    mlflow_store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``register: true``: heads trained on the champion extractor become
    ``imgsearch-attributes@champion``; the search side predicts with them for the extractor
    version they were trained on and refuses them, saying why, for another."""
    from mlflow import MlflowClient

    from registry.attributes_model import ATTRIBUTES_MODEL
    from registry.served_attributes import attribute_summary, load_attributes, predict_attributes
    from registry.tags import EXTRACTOR_MODEL, TAG_EXTRACTOR_VERSION, TAG_FINGERPRINT
    from steps import attributes as step

    extract_id, split_id, ext = style_store(tmp_path)
    client = MlflowClient()
    client.create_registered_model(EXTRACTOR_MODEL)
    source = f"{mlflow.get_run(extract_id).info.artifact_uri}/extractor"
    ext_version = client.create_model_version(
        EXTRACTOR_MODEL, source, run_id=extract_id, tags={TAG_FINGERPRINT: fingerprint(ext)}
    )
    client.set_registered_model_alias(EXTRACTOR_MODEL, "champion", ext_version.version)
    assert load_attributes("champion", ext_version.version, client).note == (
        f"no {ATTRIBUTES_MODEL}@champion registered"
    )

    run_id = step.run(extract_id, split_id, overrides=STEP_OVERRIDES)
    tag = mlflow.get_run(run_id).data.tags["imgsearch.attributes.registered"]
    assert tag == f"{ATTRIBUTES_MODEL} v1 on {EXTRACTOR_MODEL} v1 (@champion)"
    version = client.get_model_version_by_alias(ATTRIBUTES_MODEL, "champion")
    assert version.tags[TAG_EXTRACTOR_VERSION] == str(ext_version.version)

    with caplog.at_level("WARNING", logger="registry.integrity"):
        served = load_attributes("champion", str(ext_version.version), client)
    assert served.model is not None and served.label == f"{ATTRIBUTES_MODEL} v1"
    assert "without registry checksums" not in caplog.text  # the per-file check ran
    buf = io.BytesIO()
    drawing(2, 1, 9).save(buf, format="PNG")
    predicted = predict_attributes(served, [buf.getvalue(), b"not an image"])
    ok = predicted[predicted["query"] == 0]
    assert sorted(ok["attribute"]) == ["category", "vendor"]
    assert ok["probability"].between(0.0, 1.0).all() and ok["error"].isna().all()
    line = attribute_summary(predicted, 0)
    assert line.startswith("category shape") and " · vendor vendor" in line
    assert attribute_summary(predicted, 1).startswith("attributes not predicted: ")

    refused = load_attributes("champion", "99", client)
    assert refused.model is None and refused.version == "1"
    assert "trained on extractor v1, the served index on v99" in refused.note


def test_heads_of_a_non_champion_extractor_get_no_alias_and_no_register_registers_nothing(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heads' extractor is registered but another version is the champion: the heads are
    registered on their own extractor version, without ``champion``. ``--no-register`` trains
    and scores but registers nothing, and says so in the run's tag."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.attributes_model import ATTRIBUTES_MODEL
    from registry.tags import EXTRACTOR_MODEL, TAG_EXTRACTOR_VERSION, TAG_FINGERPRINT
    from steps import attributes as step

    extract_id, split_id, ext = style_store(tmp_path)
    client = MlflowClient()
    client.create_registered_model(EXTRACTOR_MODEL)
    source = f"{mlflow.get_run(extract_id).info.artifact_uri}/extractor"
    champion = client.create_model_version(
        EXTRACTOR_MODEL, source, run_id=extract_id, tags={TAG_FINGERPRINT: "0" * 64}
    )
    client.set_registered_model_alias(EXTRACTOR_MODEL, "champion", champion.version)
    ours = client.create_model_version(
        EXTRACTOR_MODEL, source, run_id=extract_id, tags={TAG_FINGERPRINT: fingerprint(ext)}
    )

    run_id = step.run(extract_id, split_id, overrides=STEP_OVERRIDES)
    tag = mlflow.get_run(run_id).data.tags["imgsearch.attributes.registered"]
    assert tag == f"{ATTRIBUTES_MODEL} v1 on {EXTRACTOR_MODEL} v{ours.version}"
    (version,) = client.search_model_versions(f"name = '{ATTRIBUTES_MODEL}'")
    assert version.tags[TAG_EXTRACTOR_VERSION] == str(ours.version) == "2"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(ATTRIBUTES_MODEL, "champion")

    seen: dict[str, Any] = {}

    def fake_run(
        extract_run_id: str, split_run_id: str, overrides: Any = None, profile: Any = None
    ) -> str:
        seen.update(overrides=overrides)
        return "run-id"

    monkeypatch.setattr(step, "run", fake_run)
    argv = ["--extract-run-id", extract_id, "--split-run-id", split_id]
    step.main([*argv, "--no-register"])
    assert seen["overrides"] == {"attributes.model": "", "attributes.register": False}
    seen.clear()
    step.main(argv)
    assert "attributes.register" not in seen["overrides"]
    monkeypatch.undo()
    off = {**STEP_OVERRIDES, "attributes.register": False}
    run_id = step.run(extract_id, split_id, overrides=off)
    assert mlflow.get_run(run_id).data.tags["imgsearch.attributes.registered"] == (
        "no: register is false"
    )
    assert len(client.search_model_versions(f"name = '{ATTRIBUTES_MODEL}'")) == 1


def test_heads_are_skipped_for_a_catalog_without_their_columns(
    mlflow_store: str, tmp_path: Path
) -> None:
    """``run_if_configured`` (main's last stage, the improve job after a promotion): no run when
    the catalog lacks a configured column or ``attributes.in_main`` is off."""
    from steps import attributes as step

    extract_id, split_id, _ = style_store(tmp_path)
    lacking = {"attributes.attributes": {"brush": {"features": ["gram"]}}}
    assert step.run_if_configured(extract_id, split_id, overrides=lacking) is None
    off = {**STEP_OVERRIDES, "attributes.in_main": False}
    assert step.run_if_configured(extract_id, split_id, overrides=off) is None
    names = [
        r.info.run_name
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
    ]
    assert names and not any(n.startswith("attributes") for n in names), names
