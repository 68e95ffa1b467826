"""Tests of imgsearch.search.index: exact search, factory choice, persistence, integrity, atomic publish."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from imgsearch.errors import ConfigError, ExtractorMismatchError, IndexIntegrityError
from imgsearch.search import measure as measure_mod
from imgsearch.search.factory import IndexConfig, choose_factory
from imgsearch.search.index import INDEX_FILE, INFO_FILE, META_FILE, ImageIndex
from imgsearch.search.measure import build_index
from imgsearch.search.publish import (
    CURRENT_FILE,
    current_index,
    current_version,
    publish_index,
    refresh_current,
    set_current,
)
from imgsearch.search.ranking import RankingTable, rank

FP = "fingerprint-a"


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_meta(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(start, start + n)],
            "item_id": [f"item{i // 2}" for i in range(start, start + n)],
            "category": ["a" if i % 3 else "b" for i in range(start, start + n)],
        }
    )


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ x.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture()
def small() -> tuple[np.ndarray, pd.DataFrame]:
    return unit(300, 16), make_meta(300)


@pytest.fixture()
def built(small: tuple[np.ndarray, pd.DataFrame]) -> ImageIndex:
    emb, meta = small
    return ImageIndex.build(emb, meta, IndexConfig(), FP)


# --- search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_matches_numpy_brute_force(small, metric: str) -> None:
    emb, meta = small
    idx = ImageIndex.build(emb, meta, IndexConfig(metric=metric), FP)
    q = unit(7, 16, seed=1)
    scores, positions = idx.search(q, 5)
    ref_scores, ref_pos = brute_force(emb, q, 5)
    np.testing.assert_array_equal(positions, ref_pos)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert scores.shape == positions.shape == (7, 5)


def test_search_pads_missing_with_minus_one(small) -> None:
    emb, meta = small
    idx = ImageIndex.build(emb[:3], meta[:3], IndexConfig(), FP)
    scores, positions = idx.search(emb[0], 5)
    assert positions.shape == (1, 5)
    assert sorted(positions[0, :3].tolist()) == [0, 1, 2] and (positions[0, 3:] == -1).all()
    assert np.isneginf(scores[0, 3:]).all()


def test_bad_inputs_raise(small) -> None:
    emb, meta = small
    with pytest.raises(ValueError, match="normalised"):
        ImageIndex.build(emb * 2, meta, IndexConfig(), FP)
    with pytest.raises(ValueError, match="rows"):
        ImageIndex.build(emb, meta[:10], IndexConfig(), FP)
    dup = meta.copy()
    dup.loc[1, "image_id"] = dup.loc[0, "image_id"]
    with pytest.raises(ValueError, match="duplicate"):
        ImageIndex.build(emb, dup, IndexConfig(), FP)
    with pytest.raises(ConfigError):
        ImageIndex.build(emb, meta, IndexConfig(factory="NoSuchThing"), FP)
    with pytest.raises(ConfigError):
        IndexConfig(metric="cosine")
    idx = ImageIndex.build(emb, meta, IndexConfig(), FP)
    with pytest.raises(ValueError):
        idx.search(unit(2, 8), 3)


# --- factory choice ---------------------------------------------------------------------------
def test_choose_factory_rule() -> None:
    assert choose_factory(0, 512) == "Flat"
    assert choose_factory(50_000, 512) == "Flat"
    assert choose_factory(100_000, 512) == "IVF256,Flat"  # sqrt(1e5) = 316 -> 256
    assert choose_factory(1_000_000, 512) == "IVF1024,Flat"
    assert choose_factory(1_000_000, 512, memory_budget_mb=1024) == "IVF1024,SQ8"  # 2 GB floats
    pq = choose_factory(10_000_000, 512, memory_budget_mb=512)  # 53 bytes/vector available
    assert pq == "IVF4096,PQ32"
    for factory in ("IVF256,Flat", "IVF1024,SQ8", pq):
        faiss.index_factory(512, factory, faiss.METRIC_INNER_PRODUCT)  # valid strings


def test_auto_ivf_build_is_trained_and_tuned() -> None:
    # 2,000 vectors with flat_max 500 -> IVF (nlist 64 clamped from sqrt(2000)~45 -> 32..64)
    centres = unit(20, 32, seed=3)
    rng = np.random.default_rng(4)
    emb = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 32)).astype(
        np.float32
    ) / np.sqrt(32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    cfg = IndexConfig(flat_max=500, eval_queries=100, train_sample=1500)
    idx, metrics = build_index(emb, make_meta(2000), cfg, FP)
    assert idx.factory.startswith("IVF") and idx.factory.endswith(",Flat")
    assert metrics["recall_at_10_vs_exact"] >= 0.95
    assert metrics["nprobe"] == idx.search_params["nprobe"] >= 1
    for key in ("build_s", "latency_ms_p50", "latency_ms_p95", "qps_batch1", "qps_batch1000"):
        assert metrics[key] > 0
    # vectors() works on IVF (direct map made on demand)
    np.testing.assert_allclose(idx.vectors(np.array([5, 7])), emb[[5, 7]], atol=1e-6)


def test_build_index_flat_metrics(small) -> None:
    emb, meta = small
    idx, metrics = build_index(emb, meta, IndexConfig(eval_queries=50), FP)
    assert metrics["factory"] == "Flat" and metrics["recall_at_10_vs_exact"] == 1.0
    assert metrics["count"] == 300 and metrics["dim"] == 16


def test_tuning_reaches_target_on_hard_data() -> None:
    # random (structure-less) data: low nprobe is poor, tuning must raise it
    emb = unit(3000, 32, seed=5)
    cfg = IndexConfig(factory="IVF64,Flat", eval_queries=200, target_recall=0.9)
    idx, metrics = build_index(emb, make_meta(3000), cfg, FP)
    assert metrics["nprobe"] > 1
    idx.set_search_params(nprobe=1)
    truth = measure_mod.exact_neighbours(emb, emb[:100], 10)
    assert measure_mod.recall_at(idx.search(emb[:100], 10)[1], truth) < 0.9


def test_recall_helper_against_naive() -> None:
    found = np.array([[1, 2, 3], [4, 5, -1]])
    truth = np.array([[3, 2, 9], [5, 6, 7]])
    naive = (len({1, 2, 3} & {3, 2, 9}) + len({4, 5} & {5, 6, 7})) / 6
    assert measure_mod.recall_at(found, truth) == pytest.approx(naive)


# --- incremental add --------------------------------------------------------------------------
def test_add_appends_rows_and_is_searchable(small) -> None:
    emb, meta = small
    idx = ImageIndex.build(emb[:200], meta[:200], IndexConfig(), FP)
    idx.add(emb[200:], meta[200:])
    assert idx.count == 300 and len(idx.meta) == 300
    assert idx.meta["image_id"].tolist() == meta["image_id"].tolist()
    _, positions = idx.search(emb[250], 1)
    assert positions[0, 0] == 250
    ref_scores, ref_pos = brute_force(emb, emb[:5], 4)
    np.testing.assert_array_equal(idx.search(emb[:5], 4)[1], ref_pos)
    with pytest.raises(ValueError, match="already"):
        idx.add(emb[:1], meta[:1])


def test_add_makes_a_ranking_table_stale(built: ImageIndex, small) -> None:
    """Ranking's derived arrays live in a RankingTable held beside the index (no memo on the
    index): after add() the old table is refused and a new one sees the new rows."""
    emb, meta = small
    table = RankingTable.from_index(built)
    assert len(table.image_ids) == 300
    extra = make_meta(2, start=1000)
    built.add(unit(2, 16, seed=9), extra)
    with pytest.raises(ValueError, match="another index state"):
        rank(built, emb[0], 3, table=table)
    assert len(RankingTable.from_index(built).image_ids) == 302


# --- save / load / integrity ------------------------------------------------------------------
def test_save_load_round_trip(built: ImageIndex, small, tmp_path: Path) -> None:
    emb, _ = small
    out = built.save(tmp_path / "ix")
    info = json.loads((out / INFO_FILE).read_text())
    assert info["extractor_fingerprint"] == FP and info["count"] == 300 and info["dim"] == 16
    assert set(info["sha256"]) == {INDEX_FILE, META_FILE} and info["factory"] == "Flat"
    loaded = ImageIndex.load(out, expected_extractor_fingerprint=FP)
    pd.testing.assert_frame_equal(loaded.meta, built.meta)
    q = unit(4, 16, seed=2)
    for a, b in zip(loaded.search(q, 6), built.search(q, 6), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.vectors(np.array([3])), emb[[3]])


def test_ivf_search_params_survive_save_load(tmp_path: Path) -> None:
    emb = unit(2000, 16, seed=7)
    idx = ImageIndex.build(emb, make_meta(2000), IndexConfig(factory="IVF32,Flat", nprobe=5), FP)
    loaded = ImageIndex.load(idx.save(tmp_path / "ix"))
    assert loaded.search_params == {"nprobe": 5}
    assert faiss.extract_index_ivf(loaded.index).nprobe == 5


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [INDEX_FILE, META_FILE])
def test_tampered_file_refused_before_faiss_reads(
    built: ImageIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    out = built.save(tmp_path / "ix")
    _flip_byte(out / name, 200)

    def forbidden(*args, **kwargs):
        raise AssertionError("FAISS/pandas parsed a file whose checksum does not match")

    monkeypatch.setattr(faiss, "read_index", forbidden)
    monkeypatch.setattr(faiss, "deserialize_index", forbidden)
    monkeypatch.setattr(pd, "read_parquet", forbidden)
    with pytest.raises(IndexIntegrityError, match="sha256"):
        ImageIndex.load(out)


def test_missing_file_and_bad_info_refused(built: ImageIndex, tmp_path: Path) -> None:
    out = built.save(tmp_path / "ix")
    info = json.loads((out / INFO_FILE).read_text())
    info["count"] = 999  # checksums fine, but the files disagree with the record
    (out / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(IndexIntegrityError, match="count"):
        ImageIndex.load(out)
    (out / INFO_FILE).write_text("{not json")
    with pytest.raises(IndexIntegrityError):
        ImageIndex.load(out)
    out2 = built.save(tmp_path / "ix2")
    (out2 / META_FILE).unlink()
    with pytest.raises(IndexIntegrityError):
        ImageIndex.load(out2)


def test_wrong_extractor_refused(built: ImageIndex, tmp_path: Path) -> None:
    out = built.save(tmp_path / "ix")
    with pytest.raises(ExtractorMismatchError, match="fingerprint-a"):
        ImageIndex.load(out, expected_extractor_fingerprint="fingerprint-b")
    assert ImageIndex.load(out, expected_extractor_fingerprint=FP).count == 300


# --- atomic publish ---------------------------------------------------------------------------
def test_publish_and_current(built: ImageIndex, small, tmp_path: Path) -> None:
    emb, meta = small
    root = tmp_path / "served"
    first = publish_index(built, root)
    assert current_version(root) == first.resolve()
    assert current_index(root, expected_extractor_fingerprint=FP).count == 300
    smaller = ImageIndex.build(emb[:50], meta[:50], IndexConfig(), FP)
    second = publish_index(smaller, root)
    assert second != first and current_index(root).count == 50
    set_current(root, first)  # roll back
    assert current_index(root).count == 300
    assert not [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".CURRENT."))]
    with pytest.raises(ExtractorMismatchError):
        current_index(root, expected_extractor_fingerprint="other")


def test_crash_mid_write_keeps_old_current(
    built: ImageIndex, small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb, meta = small
    root = tmp_path / "served"
    first = publish_index(built, root)
    new = ImageIndex.build(emb[:10], meta[:10], IndexConfig(), FP)

    def crash(
        self, *args, **kwargs
    ):  # index.faiss written, then the process "dies" writing the metadata
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        publish_index(new, root)
    monkeypatch.undo()
    assert current_version(root) == first.resolve()
    assert current_index(root).count == 300
    assert [p.name for p in (root / "versions").iterdir()] == [first.name]


def test_killed_publisher_leaves_old_current(built: ImageIndex, tmp_path: Path) -> None:
    """A publisher SIGKILLed (os._exit) after writing half of the new version's files."""
    root = tmp_path / "served"
    first = publish_index(built, root)
    script = textwrap.dedent(
        f"""
        import os, numpy as np, pandas as pd
        from imgsearch.search.factory import IndexConfig
        from imgsearch.search.index import ImageIndex
        from imgsearch.search.publish import publish_index
        x = np.eye(4, dtype=np.float32)
        meta = pd.DataFrame({{"image_id": list("abcd"), "item_id": list("abcd")}})
        idx = ImageIndex.build(x, meta, IndexConfig(), "fp")
        def die(self, *a, **k):
            os._exit(9)  # no cleanup, no exception handlers: like SIGKILL mid-write
        pd.DataFrame.to_parquet = die
        publish_index(idx, {str(root)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert proc.returncode == 9
    leftovers = [p.name for p in (root / "versions").iterdir() if p.name != first.name]
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)  # half-written
    assert current_version(root) == first.resolve()
    assert current_index(root).count == 300


def test_tampered_current_refused_and_previous_keeps_serving(
    built: ImageIndex, small, tmp_path: Path
) -> None:
    emb, meta = small
    root = tmp_path / "served"
    publish_index(built, root)
    serving = current_index(root)
    second = publish_index(ImageIndex.build(emb[:20], meta[:20], IndexConfig(), FP), root)
    _flip_byte(second / INDEX_FILE, 123)
    with pytest.raises(IndexIntegrityError):
        current_index(root)
    assert refresh_current(root, serving) is serving
    with pytest.raises(IndexIntegrityError):
        refresh_current(root, None)
    with pytest.raises(IndexIntegrityError):  # a tampered version cannot be made current either
        set_current(root, second)


def test_current_pointer_outside_versions_refused(built: ImageIndex, tmp_path: Path) -> None:
    root = tmp_path / "served"
    publish_index(built, root)
    (root / CURRENT_FILE).write_text("../../etc\n")
    with pytest.raises(IndexIntegrityError, match="outside"):
        current_index(root)


# --- the step, end to end on a private MLflow store ----------------------------------------------
@pytest.mark.slow  # a fresh MLflow SQLite store (migrations) takes tens of seconds on 2 cores
def test_index_step_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import yaml

    from imgsearch.embed.files import save_embeddings
    from imgsearch.search.ranking import RankingConfig
    from steps import index as step
    from steps.common import artifact_path, log_df

    n = 60
    rng = np.random.default_rng(0)
    centres = unit(15, 16, seed=11)
    emb = centres[np.arange(n) // 4] + 0.1 * rng.standard_normal((n, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    manifest = make_meta(n + 2)  # two manifest rows were not embedded (extract failures)
    manifest["item_id"] = [f"item{i // 4}" for i in range(n + 2)]
    manifest["split"] = [("train", "val", "test")[(i // 4) % 3] for i in range(n + 2)]
    manifest["downloads"] = rng.integers(0, 100, n + 2)
    manifest["pre_path"] = "/cache/x.npy"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as split_run:
            log_df(manifest, "manifest.parquet")
        with mlflow.start_run() as extract_run:
            mlflow.log_param("extractor_fingerprint", "fp-step")
            path = save_embeddings(tmp_path / "embeddings.parquet", manifest["image_id"][:n], emb)
            mlflow.log_artifact(str(path))
        run_id = step.run(extract_run.info.run_id, split_run_id=split_run.info.run_id)
        loaded = ImageIndex.load(artifact_path(run_id, "index"), "fp-step")
        assert loaded.count == n and "pre_path" not in loaded.meta.columns
        assert loaded.meta["image_id"].tolist() == manifest["image_id"][:n].tolist()
        metrics = mlflow.get_run(run_id).data.metrics
        assert metrics["recall_at_10_vs_exact"] == 1.0 and metrics["n_manifest_not_embedded"] == 2
        assert metrics["val_n_queries"] == 20 and 0 < metrics["val_map"] <= 1
        ranking = yaml.safe_load(artifact_path(run_id, "ranking.yaml").read_text())
        assert RankingConfig(**ranking).popularity_weight == metrics["ranking_popularity_weight"]
        table = pd.read_parquet(artifact_path(run_id, "ranking_tune.parquet"))
        assert table["best"].sum() == 1
        with pytest.raises(ExtractorMismatchError):
            ImageIndex.load(artifact_path(run_id, "index"), "another-extractor")
    finally:
        mlflow.set_tracking_uri(None)
