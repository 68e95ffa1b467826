"""Batch extraction: failures as rows, cache vs decode agreement, query path, files, options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.preprocess import PreprocessConfig, preprocess
from imgsearch.embed import files as files_mod
from imgsearch.embed import mapper as mapper_mod
from imgsearch.embed.extract import ExtractConfig, extract, resolve_parallelism
from imgsearch.embed.files import embeddings_metadata, load_embeddings, save_embeddings
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, create_extractor
from imgsearch.search.query import embed_images

SIZE = 48  # small input: fast, and enough for a real conv net


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    torch.manual_seed(0)
    ext = create_extractor("mobilenet_v2", weights="none")
    return Extractor(
        ext.body, dataclasses.replace(ext.spec, preprocess=PreprocessConfig(size=SIZE))
    )


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (40 + 7 * i, 30 + 5 * i), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, 25, 2))
        draw.ellipse(
            (x0, y0, x0 + 15, y0 + 12), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return img


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    """7 good images (PNG/JPEG, one RGBA), one text file named .png, one missing file."""
    rows = []
    for i in range(7):
        img = _image(i)
        if i == 2:
            img = img.convert("RGBA")
            img.putpixel((0, 0), (0, 0, 0, 0))
        path = tmp_path / f"img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(path)
        rows.append(
            {"image_id": f"im{i}", "item_id": f"it{i // 2}", "uri": path.name, "path": str(path)}
        )
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    rows.insert(
        3,
        {
            "image_id": "broken",
            "item_id": "itx",
            "uri": "broken.png",
            "path": str(tmp_path / "broken.png"),
        },
    )
    rows.append(
        {
            "image_id": "gone",
            "item_id": "ity",
            "uri": "gone.png",
            "path": str(tmp_path / "gone.png"),
        }
    )
    return pd.DataFrame(rows)


CFG = ExtractConfig(batch_size=3, num_workers=0, threads=1)


def test_bad_files_become_failure_rows_and_the_rest_is_embedded(
    extractor: Extractor, manifest: pd.DataFrame
) -> None:
    res = extract(extractor, manifest, CFG, progress=False)
    good = [f"im{i}" for i in range(7)]
    assert list(res.ids) == good  # manifest order, bad rows out
    assert (
        res.embeddings.shape == (7, extractor.spec.embedding_dim)
        and res.embeddings.dtype == np.float32
    )
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, atol=1e-5)
    assert list(res.failures.columns) == list(schema.QUARANTINE_COLUMNS)
    failed = res.failures.set_index("image_id")
    assert sorted(failed.index) == ["broken", "gone"]
    assert set(failed["stage"]) == {"extract"}
    assert failed.loc["gone", "reason"] == "missing_file"
    assert failed.loc["broken", "reason"] == "not_an_image"
    assert failed.loc["broken", "uri"] == "broken.png" and failed.loc["broken", "item_id"] == "itx"
    m = res.metrics
    assert (m["n"], m["n_ok"], m["n_failed"], m["n_decoded"], m["n_from_cache"]) == (9, 7, 2, 7, 0)
    assert m["images_per_s"] > 0 and m["precision_used"] == "fp32"
    # distinct images give distinct vectors
    sims = res.embeddings @ res.embeddings.T
    assert (sims[~np.eye(7, dtype=bool)] < 0.99999).all()


def test_pre_path_cache_and_decode_agree(
    extractor: Extractor, manifest: pd.DataFrame, tmp_path: Path
) -> None:
    pre = preprocess(manifest, extractor.spec.preprocess, tmp_path / "pre", progress=False)
    cached = extract(extractor, pre.manifest, CFG, progress=False)
    assert cached.metrics["n_from_cache"] == 7 and cached.metrics["n_decoded"] == 0
    decoded = extract(extractor, pre.manifest.drop(columns=["pre_path"]), CFG, progress=False)
    assert decoded.metrics["n_decoded"] == 7
    assert list(cached.ids) == list(decoded.ids)
    np.testing.assert_allclose(cached.embeddings, decoded.embeddings, atol=1e-5)

    # a cache made with other preprocessing is not used (same size, other resize policy)
    other = preprocess(
        manifest, PreprocessConfig(size=SIZE, resize="squash"), tmp_path / "pre", progress=False
    )
    fallback = extract(extractor, other.manifest, CFG, progress=False)
    assert fallback.metrics["n_from_cache"] == 0
    np.testing.assert_allclose(fallback.embeddings, decoded.embeddings, atol=1e-5)

    # a damaged cache file falls back to decoding the image
    broken = pre.manifest.copy()
    Path(broken.loc[0, "pre_path"]).write_bytes(b"garbage")
    healed = extract(extractor, broken, CFG, progress=False)
    assert healed.metrics["n_from_cache"] == 6 and healed.metrics["n_failed"] == 0
    np.testing.assert_allclose(healed.embeddings, decoded.embeddings, atol=1e-5)


def test_embed_images_matches_extract(extractor: Extractor, manifest: pd.DataFrame) -> None:
    res = extract(extractor, manifest, CFG, progress=False)
    rows = {iid: k for k, iid in enumerate(res.ids)}
    paths = manifest.set_index("image_id")["path"]
    for iid in ("im0", "im2", "im5"):  # JPEG, RGBA PNG, PNG
        query = embed_images(extractor, [imageio.open_rgb(paths[iid])])
        assert query.shape == (1, extractor.spec.embedding_dim)
        assert float(query[0] @ res.embeddings[rows[iid]]) > 0.9999

    # a non-RGB PIL image is normalised like open_rgb would (alpha on the fixed background)
    rgba = Image.open(paths["im2"])
    assert rgba.mode == "RGBA"
    np.testing.assert_allclose(
        embed_images(extractor, [rgba]),
        embed_images(extractor, [imageio.open_rgb(paths["im2"])]),
        atol=1e-6,
    )
    assert embed_images(extractor, []).shape == (0, extractor.spec.embedding_dim)


def test_workers_and_out_memmap_give_the_same_vectors(
    extractor: Extractor, manifest: pd.DataFrame, tmp_path: Path
) -> None:
    base = extract(extractor, manifest, CFG, progress=False)
    cfg = dataclasses.replace(CFG, num_workers=1, channels_last=False)
    streamed = extract(extractor, manifest, cfg, out=tmp_path / "emb.npy", progress=False)
    assert list(streamed.ids) == list(base.ids)
    np.testing.assert_allclose(streamed.embeddings, base.embeddings, atol=1e-5)
    on_disk = np.load(tmp_path / "emb.npy", mmap_mode="r")
    assert on_disk.shape == (
        len(manifest),
        extractor.spec.embedding_dim,
    )  # N rows; the first n_ok are valid
    np.testing.assert_array_equal(on_disk[: len(base.ids)], streamed.embeddings)


def test_extract_leaves_the_extractor_and_torch_as_it_found_them(
    extractor: Extractor, manifest: pd.DataFrame
) -> None:
    threads = torch.get_num_threads()
    extractor.train()
    try:
        extract(
            extractor,
            manifest,
            dataclasses.replace(CFG, threads=max(1, threads - 1) or 1),
            progress=False,
        )
        assert extractor.training
        assert torch.get_num_threads() == threads
        assert all(p.is_contiguous() for p in extractor.parameters())
    finally:
        extractor.eval()


def test_bf16_is_gated_on_first_batch_cosine(
    extractor: Extractor, manifest: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = extract(extractor, manifest, CFG, progress=False)
    bf16 = extract(extractor, manifest, dataclasses.replace(CFG, precision="bf16"), progress=False)
    assert "bf16_min_cosine" in bf16.metrics
    if bf16.metrics["bf16_min_cosine"] >= mapper_mod.BF16_MIN_COSINE:
        assert bf16.metrics["bf16_used"] == float(bf16.metrics["bf16_speedup"] > 1)
    if bf16.metrics["bf16_used"]:
        assert bf16.metrics["bf16_min_cosine"] >= mapper_mod.BF16_MIN_COSINE
        assert (np.sum(bf16.embeddings * fp32.embeddings, axis=1) > 0.99).all()
        np.testing.assert_allclose(np.linalg.norm(bf16.embeddings, axis=1), 1.0, atol=1e-5)
    monkeypatch.setattr(mapper_mod, "BF16_MIN_COSINE", 1.01)  # unreachable: must fall back
    refused = extract(
        extractor, manifest, dataclasses.replace(CFG, precision="bf16"), progress=False
    )
    assert refused.metrics["bf16_used"] == 0 and refused.metrics["precision_used"] == "fp32"
    np.testing.assert_array_equal(refused.embeddings, fp32.embeddings)


def test_compile_failure_falls_back_to_eager(
    extractor: Extractor, manifest: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    res = extract(extractor, manifest, dataclasses.replace(CFG, compile=True), progress=False)
    assert res.metrics["compile_used"] == 0 and res.metrics["n_ok"] == 7


@pytest.mark.slow
def test_compile_really_compiles(extractor: Extractor, manifest: pd.DataFrame) -> None:
    eager = extract(extractor, manifest, CFG, progress=False)
    res = extract(extractor, manifest, dataclasses.replace(CFG, compile=True), progress=False)
    assert res.metrics["compile_used"] == 1, res.metrics
    np.testing.assert_allclose(res.embeddings, eager.embeddings, atol=1e-4)


def test_empty_manifest_and_bad_input(extractor: Extractor, manifest: pd.DataFrame) -> None:
    empty = extract(extractor, manifest.iloc[:0], CFG, progress=False)
    assert empty.embeddings.shape == (0, extractor.spec.embedding_dim) and len(empty.failures) == 0
    with pytest.raises(ValueError, match="path"):
        extract(extractor, manifest.drop(columns=["path"]), CFG, progress=False)
    with pytest.raises(ValueError, match="unique"):
        extract(extractor, pd.concat([manifest, manifest.iloc[:1]]), CFG, progress=False)


def test_config_validation_and_parallelism() -> None:
    with pytest.raises(ConfigError):
        ExtractConfig(precision="fp8")
    with pytest.raises(ConfigError):
        ExtractConfig(num_workers=-1)
    with pytest.raises(ConfigError):
        ExtractConfig(batch_size=0)
    with pytest.raises(ConfigError):
        ExtractConfig(device="gpu0")
    assert resolve_parallelism(ExtractConfig(num_workers=2, threads=3), cores=8) == (2, 3)
    assert resolve_parallelism(ExtractConfig(), cores=2) == (0, 2)
    assert resolve_parallelism(ExtractConfig(), cores=16) == (2, 14)
    assert resolve_parallelism(ExtractConfig(num_workers=1), cores=2) == (1, 1)
    for cores in (1, 2, 3, 4, 8, 64):
        workers, threads = resolve_parallelism(ExtractConfig(), cores=cores)
        assert workers >= 0 and threads >= 1 and workers + threads == cores


def test_embeddings_file_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_mod, "_PARQUET_ROWS_PER_GROUP", 4)  # several row groups
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((11, 5)).astype(np.float32)
    ids = np.array([f"id{i}" for i in range(11)], dtype=object)
    path = save_embeddings(
        tmp_path / "e.parquet", ids, emb, metadata={"extractor_fingerprint": "abc"}
    )
    got_ids, got = load_embeddings(path)
    assert list(got_ids) == list(ids) and got.dtype == np.float32
    np.testing.assert_array_equal(got, emb)
    assert embeddings_metadata(path) == {"embedding_dim": "5", "extractor_fingerprint": "abc"}
    df = pd.read_parquet(path)  # readable by plain pandas too
    assert list(df.columns) == ["image_id", "embedding"] and len(df) == 11

    e_ids, e = load_embeddings(
        save_embeddings(tmp_path / "empty.parquet", [], np.zeros((0, 5), np.float32))
    )
    assert len(e_ids) == 0 and e.shape == (0, 5)
    with pytest.raises(ValueError, match="unique"):
        save_embeddings(tmp_path / "dup.parquet", ["a", "a"], emb[:2])
    with pytest.raises(ValueError, match="shape"):
        save_embeddings(tmp_path / "bad.parquet", ["a"], emb[:2])


@pytest.mark.slow  # an MLflow sqlite store + two runs: ~10 s of CPU
def test_step_logs_embeddings_extractor_and_failures(
    manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steps.extract end to end on a private MLflow store; then re-run from runs:/<id>/extractor."""
    import mlflow

    from imgsearch.models.backbones import fingerprint, load_extractor
    from steps import extract as step
    from steps.common import artifact_path, log_df

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the Default experiment
    try:
        with mlflow.start_run() as pre_run:
            log_df(manifest, "manifest.parquet")
        overrides = {"extract.weights": "none", "extract.num_workers": 0, "extract.batch_size": 4}
        run_id = step.run(pre_run.info.run_id, overrides=overrides)

        ids, emb = load_embeddings(artifact_path(run_id, "embeddings.parquet"))
        assert sorted(ids) == [f"im{i}" for i in range(7)] and emb.shape == (7, 1280)
        ext = load_extractor(artifact_path(run_id, "extractor"))
        params = mlflow.get_run(run_id).data.params
        assert params["extractor_fingerprint"] == fingerprint(ext)
        assert embeddings_metadata(artifact_path(run_id, "embeddings.parquet"))[
            "extractor_fingerprint"
        ] == fingerprint(ext)
        failures = pd.read_parquet(artifact_path(run_id, "quarantine.parquet"))
        assert sorted(failures["image_id"]) == ["broken", "gone"]
        logged = pd.read_parquet(artifact_path(run_id, "manifest.parquet"))
        assert sorted(logged["image_id"]) == sorted(ids)
        assert mlflow.get_run(run_id).data.metrics["n_failed"] == 2

        again = step.run(
            pre_run.info.run_id, extractor_uri=f"runs:/{run_id}/extractor", overrides=overrides
        )
        ids2, emb2 = load_embeddings(artifact_path(again, "embeddings.parquet"))
        assert list(ids2) == list(ids)
        np.testing.assert_allclose(emb2, emb, atol=1e-5)
        assert (
            mlflow.get_run(again).data.params["extractor_fingerprint"]
            == params["extractor_fingerprint"]
        )
    finally:
        mlflow.set_tracking_uri(None)


def test_runner_per_partition_writes_shards_equal_to_one_pass(
    extractor: Extractor, manifest: pd.DataFrame, tmp_path: Path
) -> None:
    """The parts are public: a partition-wise runner (Spark) calls the same reader -> mapper ->
    writer per slice and writes shards with the schema of the single file, same vectors."""
    from imgsearch.embed.mapper import Mapper
    from imgsearch.embed.reader import ManifestReader
    from imgsearch.embed.runner import Runner
    from imgsearch.embed.writer import EmbeddingWriter

    whole = extract(extractor, manifest, CFG, progress=False)
    runner = Runner(
        reader_builder=lambda: ManifestReader(extractor.spec.preprocess, batch_size=3),
        mapper_builder=lambda: Mapper(extractor, torch.device("cpu")),
        writer_builder=lambda n: EmbeddingWriter(n, extractor.spec.embedding_dim),
    )
    shards, failures = [], []
    for i, part in enumerate((manifest.iloc[:5], manifest.iloc[5:])):
        result = runner(part)
        failures += [row["image_id"] for row in result.failures]
        shards.append(result.writer.save(tmp_path / "emb" / f"part-{i:05d}.parquet", {"fp": "x"}))
    assert sorted(failures) == sorted(whole.failures["image_id"])
    got = pd.read_parquet(tmp_path / "emb")  # the folder of shards reads as one table
    assert got["image_id"].tolist() == list(whole.ids)
    ids, emb = zip(*(load_embeddings(p) for p in shards), strict=True)
    np.testing.assert_allclose(np.concatenate(emb), whole.embeddings, atol=1e-6)
    assert embeddings_metadata(shards[0]) == embeddings_metadata(shards[1])
