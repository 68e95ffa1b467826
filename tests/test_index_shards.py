"""Index from sharded embeddings: the same index and metrics as from one array, one shard in memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgsearch.embed.files import load_embeddings, save_embeddings
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.measure import build_index, exact_neighbours
from imgsearch.search.publish import current_index, publish_index
from imgsearch.search.shards import (
    build_index_from_shards,
    exact_neighbours_sharded,
    select_embeddings,
)
from tests.test_index import FP, brute_force, make_meta, unit


def _write_shards(folder: Path, emb: np.ndarray, sizes: list[int]) -> Path:
    ids = np.asarray([f"img{i}" for i in range(len(emb))], dtype=object)
    start = 0
    for part, size in enumerate(sizes):
        stop = start + size
        save_embeddings(folder / f"part-{part:05d}.parquet", ids[start:stop], emb[start:stop])
        start = stop
    assert start == len(emb)
    return folder


@pytest.mark.parametrize(
    "factory,n,sizes",
    [("Flat", 500, [120, 0, 200, 180]), ("IVF16,Flat", 2400, [700, 700, 700, 300])],
)
def test_from_shards_equals_from_one_array(
    tmp_path: Path, factory: str, n: int, sizes: list[int]
) -> None:
    emb = unit(n, 16, seed=4)
    meta = make_meta(n)
    folder = _write_shards(tmp_path / "embeddings.parquet", emb, sizes)
    cfg = IndexConfig(factory=factory, train_sample=1000, eval_queries=120, target_recall=0.9)

    whole, m_whole = build_index(emb, meta, cfg, FP)
    sharded, m_shards = build_index_from_shards(folder, meta, cfg, FP)

    assert sharded.count == n and m_shards["shards"] == len(sizes)
    pd.testing.assert_frame_equal(sharded.meta, whole.meta)
    for key in ("recall_at_10_vs_exact", "count", "factory", "nprobe"):
        assert m_shards.get(key) == m_whole.get(key), key
    q = unit(30, 16, seed=9)
    np.testing.assert_array_equal(sharded.search(q, 10)[1], whole.search(q, 10)[1])
    # saved with checksums and published atomically like any index
    published = publish_index(sharded, tmp_path / "served")
    assert current_index(tmp_path / "served", FP).count == n
    assert ImageIndex.load(published).factory == factory


def test_sharded_exact_neighbours_match_a_brute_force_scan(tmp_path: Path) -> None:
    emb = unit(400, 8, seed=1)
    folder = _write_shards(tmp_path / "e", emb, [1, 150, 99, 150])
    q = unit(25, 8, seed=2)
    got = exact_neighbours_sharded(folder, q, 10)
    _, want = brute_force(emb, q, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, exact_neighbours(emb, q, 10))


def _numpy_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_from_shards_holds_one_shard_at_a_time(tmp_path: Path) -> None:
    """Traced peak (numpy and Python; FAISS's own memory is not traced) beside the index: well
    under the whole array from shards, at least the whole array when loading it all first."""
    n, d, parts = 8000, 256, 8
    emb = unit(n, d, seed=5)
    folder = _write_shards(tmp_path / "e", emb, [n // parts] * parts)
    meta = make_meta(n)
    total = emb.nbytes
    del emb
    cfg = IndexConfig(factory="IVF32,Flat", train_sample=1300, eval_queries=100, target_recall=0.8)
    sharded = _numpy_peak(lambda: build_index_from_shards(folder, meta, cfg, FP))
    whole = _numpy_peak(lambda: build_index(load_embeddings(folder)[1], meta, cfg, FP))
    assert sharded < 0.5 * total <= 0.5 * whole, (sharded, whole, total)


def test_select_embeddings_and_bad_input(tmp_path: Path) -> None:
    emb = unit(50, 4, seed=3)
    folder = _write_shards(tmp_path / "e", emb, [20, 30])
    ids, got = select_embeddings(folder, {"img3", "img40"})
    assert list(ids) == ["img3", "img40"]
    np.testing.assert_array_equal(got, emb[[3, 40]])
    assert select_embeddings(folder, {"nope"})[1].shape == (0, 4)
    with pytest.raises(ValueError, match="not in the manifest"):
        build_index_from_shards(folder, make_meta(10), IndexConfig(factory="Flat"))
    with pytest.raises(FileNotFoundError):
        build_index_from_shards(tmp_path / "missing", make_meta(10))
    save_embeddings(tmp_path / "dup" / "part-00000.parquet", ["img1"], emb[:1])
    save_embeddings(tmp_path / "dup" / "part-00001.parquet", ["img1"], emb[1:2])
    with pytest.raises(ValueError, match="duplicate image_id"):
        build_index_from_shards(tmp_path / "dup", make_meta(10), IndexConfig(factory="Flat"))


def test_shard_folder_reading_refuses_duplicates_and_empty_folders(tmp_path: Path) -> None:
    emb = unit(4, 4, seed=8)
    save_embeddings(tmp_path / "dup" / "part-00000.parquet", ["a", "b"], emb[:2])
    save_embeddings(tmp_path / "dup" / "part-00001.parquet", ["b", "c"], emb[2:])
    (tmp_path / "dup" / "_SUCCESS").touch()  # Spark's marker and hidden temp files are no shards
    (tmp_path / "dup" / ".part-00002-x.parquet").write_bytes(b"partial")
    with pytest.raises(ValueError, match="more than one shard"):
        load_embeddings(tmp_path / "dup")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without embedding shards"):
        load_embeddings(tmp_path / "empty")
