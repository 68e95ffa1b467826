"""int8 extraction: ONNX Runtime quantisation, the MAP@R check, and the fp32 fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from imgsearch.data.preprocess import PreprocessConfig, to_tensor, to_uint8
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.errors import ConfigError
from imgsearch.evaluate import int8 as int8_mod
from imgsearch.evaluate.int8 import Int8Config, check_rows, extract_int8
from imgsearch.evaluate.quantization import (
    int8_scores,
    mixed_map_at_r,
    quality_check,
    searched_check,
    searched_map_at_r,
    whole_items,
)
from imgsearch.evaluate.retrieval import retrieval_map_at_r
from imgsearch.models.backbones import Extractor, ExtractorSpec
from imgsearch.models.quantize import (
    QuantizationUnavailableError,
    QuantizedExtractor,
    quantize,
    require_onnxruntime,
)

SIZE = 32


def tiny_extractor() -> Extractor:
    """A small conv net (conv-BN-ReLU, a residual add, global pooling): exports in seconds."""
    torch.manual_seed(0)

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
            self.out = nn.Conv2d(16, 24, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return torch.relu(self.out(torch.relu(y + self.block(y))))

    spec = ExtractorSpec("tiny", "none", 24, PreprocessConfig(size=SIZE))
    return Extractor(Body(), spec).eval()


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return tiny_extractor()


def _image(item: int, k: int) -> Image.Image:
    """Images of one item share a background colour and shapes; ``k`` moves them a little."""
    rng = np.random.default_rng(item)
    img = Image.new("RGB", (48, 40), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) + k for v in rng.integers(0, 25, 2))
        draw.ellipse(
            (x0, y0, x0 + 14, y0 + 11), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return img


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """8 items x 3 images: items 0-4 train, 5-7 val."""
    root = tmp_path_factory.mktemp("int8")
    rows = []
    for item in range(8):
        for k in range(3):
            path = root / f"i{item}_{k}.png"
            _image(item, k).save(path)
            rows.append(
                {
                    "image_id": f"i{item}_{k}",
                    "item_id": f"item{item}",
                    "uri": path.name,
                    "path": str(path),
                    "split": "train" if item < 5 else "val",
                }
            )
    return pd.DataFrame(rows)


def _pixels(manifest: pd.DataFrame) -> torch.Tensor:
    pre = PreprocessConfig(size=SIZE)
    arrays = [to_uint8(Image.open(p).convert("RGB"), pre) for p in manifest["path"]]
    return to_tensor(np.stack(arrays), pre)


CFG = ExtractConfig(batch_size=8, num_workers=0, threads=1, precision="int8")


def test_quantized_embeddings_are_close_to_fp32(
    extractor: Extractor, manifest: pd.DataFrame
) -> None:
    x = _pixels(manifest)
    q = quantize(extractor, x[:12], threads=1)
    assert isinstance(q, QuantizedExtractor) and q.spec == extractor.spec
    with torch.inference_mode():
        ref = extractor(x)
    low = q(x)
    assert low.shape == ref.shape and low.dtype == torch.float32
    np.testing.assert_allclose(low.norm(dim=1).numpy(), 1.0, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(ref, low, dim=1)
    assert float(cosine.min()) > 0.98, cosine
    assert q.onnx_model[:2] and len(q.onnx_model) > 1000  # ONNX bytes, savable


def test_quantize_refuses_images_of_the_wrong_size(extractor: Extractor) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize(extractor, torch.zeros(2, 3, SIZE + 1, SIZE + 1))


def test_quality_check_keeps_a_close_embedding_and_refuses_a_broken_one() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    labels = np.repeat(np.arange(10), 4)
    fp32 = centres[labels] + 0.3 * rng.normal(size=(40, 16))
    close = fp32 + 1e-4 * rng.normal(size=fp32.shape)
    kept = quality_check(fp32, close, labels, tolerance=0.005)
    assert kept["keep"] and kept["map_at_r_fp32"] > 0.5
    assert abs(kept["map_at_r_drop"]) <= 0.005 and kept["min_cosine"] > 0.999

    broken = rng.permutation(fp32)  # right shape, wrong images: the ranking is destroyed
    refused = quality_check(fp32, broken, labels, tolerance=0.005)
    assert not refused["keep"]
    assert refused["map_at_r_drop"] > 0.005 and "tolerance 0.005" in refused["reason"]
    assert refused["map_at_r_fp32"] == pytest.approx(kept["map_at_r_fp32"])


def _naive_searched_map_at_r(
    q: np.ndarray, own: list[int], g: np.ndarray, labels: np.ndarray
) -> float:
    """Obviously correct: each query ranks every gallery row but its own, AP@R over the first R."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps = []
    for i, row in enumerate(own):
        others = [j for j in range(len(g)) if j != row]
        ranked = sorted(others, key=lambda j: (-float(q[i] @ g[j]), j))
        r = sum(labels[j] == labels[row] for j in others)
        if r == 0:
            continue
        hits, total = 0, 0.0
        for rank, j in enumerate(ranked[:r], start=1):
            if labels[j] == labels[row]:
                hits += 1
                total += hits / rank
        aps.append(total / r)
    return float(np.mean(aps))


def test_mixed_map_at_r_matches_a_naive_reference_and_the_one_implementation() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 30)
    fp32 = rng.normal(size=(30, 8)) + 2 * np.eye(8)[labels % 8]
    int8 = fp32 + 0.5 * rng.normal(size=fp32.shape)
    assert mixed_map_at_r(fp32, int8, labels) == pytest.approx(
        _naive_searched_map_at_r(fp32, list(range(len(fp32))), int8, labels)
    )
    assert mixed_map_at_r(fp32, fp32, labels) == pytest.approx(retrieval_map_at_r(fp32, labels))


def test_quality_check_refuses_when_map_at_r_cannot_be_measured() -> None:
    emb = np.eye(4, dtype=np.float32)
    scores = int8_scores(emb, emb, ["a", "b", "c", "d"])  # no item has a second image
    assert np.isnan(scores["map_at_r_drop"])
    result = quality_check(emb, emb, ["a", "b", "c", "d"])
    assert not result["keep"] and "cannot be measured" in result["reason"]


def test_extract_int8_keeps_int8_when_map_at_r_holds(
    extractor: Extractor, manifest: pd.DataFrame
) -> None:
    cfg = ExtractConfig(**{**CFG.__dict__, "int8": {"tolerance": 1.0}})
    res = extract_int8(extractor, manifest, cfg, progress=False)
    assert res.metrics["int8_used"] == 1.0 and res.metrics["precision_used"] == "int8"
    assert res.metrics["int8_calibration_images"] == 15 and res.metrics["int8_check_images"] == 9
    for key in ("int8_map_at_r_fp32", "int8_map_at_r_int8", "int8_map_at_r_mixed"):
        assert np.isfinite(res.metrics[key])
    ref = extract(extractor, manifest, ExtractConfig(batch_size=8, threads=1), progress=False)
    assert list(res.ids) == list(ref.ids)
    assert float((res.embeddings * ref.embeddings).sum(axis=1).min()) > 0.98


class BrokenQuantized(QuantizedExtractor):
    """A 'quantised' extractor whose vectors are noise: the check must refuse it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(len(x))
        return torch.nn.functional.normalize(
            torch.randn(len(x), self.spec.embedding_dim, generator=gen), dim=1
        )


def test_extract_int8_falls_back_to_fp32_with_the_reason(
    extractor: Extractor, manifest: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        int8_mod,
        "quantize",
        lambda ext, pixels, cfg, threads: BrokenQuantized(ext.spec, b"", None, threads=threads),
    )
    res = extract_int8(extractor, manifest, CFG, progress=False)
    assert res.metrics["int8_used"] == 0.0 and res.metrics["precision_used"] == "fp32"
    assert res.metrics["int8_map_at_r_drop"] > 0.005
    assert "below fp32" in res.metrics["int8_reason"]
    ref = extract(extractor, manifest, ExtractConfig(batch_size=8, threads=1), progress=False)
    np.testing.assert_allclose(res.embeddings, ref.embeddings, atol=1e-6)  # plain fp32


def test_extract_int8_without_a_split_runs_fp32_and_says_why(
    extractor: Extractor, manifest: pd.DataFrame
) -> None:
    res = extract_int8(extractor, manifest.drop(columns="split"), CFG, progress=False)
    assert res.metrics["int8_used"] == 0.0 and "no split column" in res.metrics["int8_reason"]
    assert len(res.ids) == len(manifest)


def test_missing_onnxruntime_is_a_clear_error(
    extractor: Extractor, manifest: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(QuantizationUnavailableError, match="onnxruntime.*pip install"):
        require_onnxruntime()
    with pytest.raises(QuantizationUnavailableError, match="onnxruntime"):
        extract_int8(extractor, manifest, CFG, progress=False)
    with pytest.raises(QuantizationUnavailableError):
        quantize(extractor, _pixels(manifest))


def test_int8_config_is_checked(manifest: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="local engine"):
        ExtractConfig(precision="int8", engine="spark")
    with pytest.raises(ConfigError, match="tolerance"):
        Int8Config(tolerance=-0.1)
    with pytest.raises(ConfigError, match="activation"):
        Int8Config(activation="int4")
    rows = check_rows(manifest, Int8Config(check_images=4))  # whole items, never a part of one
    assert len(rows) == 3 and rows["item_id"].nunique() == 1 and set(rows["split"]) == {"val"}


def test_saved_onnx_model_runs_in_a_fresh_session(
    extractor: Extractor, manifest: pd.DataFrame, tmp_path: Path
) -> None:
    x = _pixels(manifest)
    q = quantize(extractor, x[:8], threads=1)
    again = QuantizedExtractor(extractor.spec, q.save(tmp_path / "m.onnx").read_bytes(), threads=1)
    np.testing.assert_allclose(again(x).numpy(), q(x).numpy(), atol=1e-6)


@pytest.mark.slow  # an MLflow sqlite store, a MobileNetV2 export and quantisation: ~1 min of CPU
def test_step_logs_the_int8_decision(
    manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steps.extract with precision int8: both MAP@Rs and the decision land in the run."""
    import dataclasses

    import mlflow

    from imgsearch.embed.files import embeddings_metadata, load_embeddings
    from imgsearch.models.backbones import create_extractor, save_extractor
    from steps import extract as step
    from steps.common import artifact_path, log_df

    small = create_extractor("mobilenet_v2", weights="none")
    small = Extractor(
        small.body, dataclasses.replace(small.spec, preprocess=PreprocessConfig(size=SIZE))
    )
    saved = save_extractor(small, tmp_path / "extractor")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as pre_run:
            log_df(manifest, "manifest.parquet")
        overrides = {
            "extract.precision": "int8",
            "extract.num_workers": 0,
            "extract.batch_size": 8,
            "extract.int8": {"tolerance": 0.005, "calibration_images": 8},
        }
        run_id = step.run(pre_run.info.run_id, extractor_uri=str(saved), overrides=overrides)
        data = mlflow.get_run(run_id).data
        for key in ("int8_used", "int8_map_at_r_fp32", "int8_map_at_r_int8", "int8_map_at_r_drop"):
            assert key in data.metrics, key
        assert data.params["int8_reason"] and data.params["precision_requested"] == "int8"
        used = data.metrics["int8_used"] == 1.0
        assert data.params["precision_used"] == ("int8" if used else "fp32")
        assert used == (data.metrics["int8_map_at_r_drop"] <= 0.005)
        ids, emb = load_embeddings(artifact_path(run_id, "embeddings.parquet"))
        assert len(ids) == len(manifest) and emb.shape[1] == small.spec.embedding_dim
        meta = embeddings_metadata(artifact_path(run_id, "embeddings.parquet"))
        assert meta["precision"] == data.params["precision_used"]
        assert mlflow.get_run(run_id).data.tags["imgsearch.extract.precision"] == meta["precision"]
        # the decision travels to the registered versions, and int8 to the index's serving mode
        from steps.register import precision_tags

        tags, serving_mode = precision_tags(run_id)
        assert tags["imgsearch.extract.precision"] == meta["precision"]
        assert tags["imgsearch.extract.int8_reason"] == data.params["int8_reason"]
        assert float(tags["imgsearch.extract.int8_used"]) == data.metrics["int8_used"]
        assert serving_mode == ("int8" if used else None)
    finally:
        mlflow.set_tracking_uri(None)


def _exact_search(gallery: np.ndarray):  # noqa: ANN202 - a Search
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)

    def search(q: np.ndarray, k: int) -> np.ndarray:
        return np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]

    return search


def test_searched_map_at_r_matches_a_naive_reference() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 60)
    gallery = rng.normal(size=(60, 8)) + 1.5 * np.eye(8)[labels]
    own = [int(i) for i in rng.choice(60, 20, replace=False)]
    queries = gallery[own] + 0.6 * rng.normal(size=(20, 8))  # another precision's vectors
    got = searched_map_at_r(queries, own, labels, _exact_search(gallery))
    assert got == pytest.approx(_naive_searched_map_at_r(queries, own, gallery, labels))
    # the gallery's own vectors as queries: the same as leave-one-out MAP@R on the gallery
    every = list(range(60))
    assert searched_map_at_r(gallery, every, labels, _exact_search(gallery)) == pytest.approx(
        retrieval_map_at_r(gallery, labels)
    )
    lonely = searched_map_at_r(
        gallery[:3], [0, 1, 2], ["a", "b", "c"] + ["d"] * 57, _exact_search(gallery)
    )
    assert np.isnan(lonely)


def test_searched_check_keeps_close_queries_and_refuses_ones_that_lost_the_ranking() -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(30), 4)
    gallery = rng.normal(size=(30, 16))[labels] + 0.5 * rng.normal(size=(120, 16))
    own = list(range(0, 120, 3))
    search = _exact_search(gallery)
    close = gallery[own] + 1e-3 * rng.normal(size=(40, 16))
    kept = searched_check(gallery[own], close, own, labels, search, tolerance=0.005)
    assert kept["keep"] and abs(kept["map_at_r_drop"]) <= 0.005 and "on the index" in kept["reason"]
    lost = rng.permutation(gallery[own])  # right shape, wrong images
    refused = searched_check(gallery[own], lost, own, labels, search, tolerance=0.005)
    assert not refused["keep"] and "below fp32" in refused["reason"]


def test_searched_check_is_inconclusive_when_fp32_finds_nothing_on_the_index() -> None:
    """An index whose vectors are not what the extractor makes of the check images (here: random
    ones) gives fp32 and int8 the same MAP@R of ~0: no drop, and no evidence. int8 is refused."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(30), 4)
    images = rng.normal(size=(30, 16))[labels] + 0.5 * rng.normal(size=(120, 16))
    unrelated = _exact_search(rng.normal(size=(120, 16)))
    own = list(range(0, 120, 3))
    got = searched_check(images[own], images[own], own, labels, unrelated, tolerance=0.05)
    assert got["map_at_r_drop"] == 0.0 and got["map_at_r_fp32"] <= 0.05
    assert not got["keep"] and "inconclusive" in got["reason"]


def test_serving_int8_runs_on_onnx_runtime_and_degrades_without_it(
    extractor: Extractor, manifest: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgsearch.search import query as serving
    from registry.decoding import gallery_images

    gallery = gallery_images(manifest, calibration=6, check=12)  # the index's meta: path, item_id
    assert len(gallery.calibration) == 6 and len(gallery.check) == 12
    assert set(pd.Series(gallery.labels).value_counts()) == {3}  # whole items
    served = serving.prepare_serving(extractor, "int8", gallery=gallery)
    assert served.mode == "int8" and isinstance(served.model, QuantizedExtractor), served.metrics
    assert served.metrics["int8_map_at_r_drop"] <= 0.005
    assert served.metrics["int8_checked_on"] == "check images"  # no index given
    # with the index's search: the check images rank through the whole gallery, as served
    images = [Image.open(p).convert("RGB") for p in manifest["path"]]
    vectors = serving.prepare_serving(extractor, "eager").embed(images)
    indexed = gallery_images(manifest, calibration=6, check=12, search=_exact_search(vectors))
    assert [manifest["item_id"][i] for i in indexed.own] == list(indexed.labels)
    served = serving.prepare_serving(extractor, "int8", gallery=indexed)
    assert served.metrics["int8_checked_on"] == "index", served.metrics
    assert served.mode == "int8" and served.metrics["int8_map_at_r_drop"] <= 0.005
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    fallback = serving.prepare_serving(extractor, "int8", gallery=gallery)
    assert fallback.mode == "fused" and "pip install onnxruntime" in fallback.metrics["int8_error"]


def test_gallery_sample_skips_unreadable_files_and_single_image_items(
    manifest: pd.DataFrame,
) -> None:
    from registry.decoding import gallery_images

    meta = manifest.copy()
    meta.loc[0, "path"] = "/nonexistent/x.png"  # unreadable: skipped, its item keeps 2 images
    meta = pd.concat([meta, pd.DataFrame([{**meta.iloc[1].to_dict(), "item_id": "alone"}])])
    gallery = gallery_images(meta, calibration=4, check=100)
    assert "alone" not in gallery.labels and len(gallery.check) == len(gallery.labels) == 23
    assert len(gallery.calibration) == 1  # the one-image item is the only other row
    assert len(gallery_images(meta.drop(columns=["path"])).check) == 0


def test_whole_items_takes_every_image_of_each_item_chosen() -> None:
    items = pd.Series(["a"] * 3 + ["b"] * 2 + ["c"] + ["d"] * 4)
    assert whole_items(items, 100).all()
    assert whole_items(items, 100, min_images=2).tolist() == [True] * 5 + [False] + [True] * 4
    mask = whole_items(items, 5, seed=3)
    picked = items[mask]
    assert 1 <= len(picked) <= 5
    assert all((items == i).sum() == (picked == i).sum() for i in picked.unique())
    assert whole_items(items, 5, seed=3).tolist() == mask.tolist()  # seeded


def test_serving_direction_scores_int8_queries_on_the_fp32_gallery() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 25)
    fp32 = rng.normal(size=(25, 8)) + 2 * np.eye(8)[labels]
    int8 = fp32 + 0.7 * rng.normal(size=fp32.shape)
    serving_side = int8_scores(fp32, int8, labels, int8_queries=True)
    assert serving_side["map_at_r_mixed"] == pytest.approx(mixed_map_at_r(int8, fp32, labels))
    extraction_side = int8_scores(fp32, int8, labels)
    assert extraction_side["map_at_r_mixed"] == pytest.approx(mixed_map_at_r(fp32, int8, labels))
