"""The Spark engine: same embeddings and failures as the local engine, shards readable as one file.

Skipped (with the reason) when pyspark is not importable, unless ``IMGSEARCH_REQUIRE_SPARK=1``
(set by ``.ci/run``, which installs ``.[spark]`` and runs this slow test explicitly) makes that a
failure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.embed.files import (
    count_embeddings,
    embedding_ids,
    embeddings_metadata,
    load_embeddings,
    shard_paths,
)
from imgsearch.embed.spark_runner import SparkConfig, spark_extract
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, create_extractor, save_extractor

REQUIRE_ENV = "IMGSEARCH_REQUIRE_SPARK"


@pytest.fixture
def pyspark_present() -> None:
    if importlib.util.find_spec("pyspark") is None:
        reason = "pyspark is not installed: pip install '.[spark]' (CI does)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)


def _catalog(root: Path, n: int = 23) -> pd.DataFrame:
    """n small images of different sizes and colours, one corrupt file and one missing file."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 255, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)
        path = root / f"im{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        Image.fromarray(arr).save(path)
        rows.append(
            {
                "image_id": f"im{i:02d}",
                "item_id": f"it{i // 3}",
                "uri": path.name,
                "path": str(path),
            }
        )
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rows.insert(
        5,
        {
            "image_id": "corrupt",
            "item_id": "itx",
            "uri": "corrupt.jpg",
            "path": str(root / "corrupt.jpg"),
        },
    )
    rows.insert(
        17,
        {"image_id": "gone", "item_id": "ity", "uri": "gone.png", "path": str(root / "gone.png")},
    )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def spark_session() -> Iterator[object]:
    """One local[2] session for the module (starting Spark takes ~30 s here); the engine uses
    an active session as it is."""
    if importlib.util.find_spec("pyspark") is None:
        yield None
        return
    from imgsearch.embed.spark_runner import spark_session as make

    session, _ = make(SparkConfig(master="local[2]", conf={"spark.driver.memory": "1g"}))
    yield session
    session.stop()  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.usefixtures("pyspark_present", "spark_session")
def test_spark_engine_matches_local_engine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = create_extractor("mobilenet_v2", weights="none")
    extractor = Extractor(
        base.body, dataclasses.replace(base.spec, preprocess=PreprocessConfig(size=40))
    )
    manifest = _catalog(tmp_path)
    cfg = ExtractConfig(batch_size=4, num_workers=0, threads=1, engine="spark")
    local = extract(extractor, manifest, cfg, progress=False)

    ext_dir = save_extractor(extractor, tmp_path / "extractor")
    out = tmp_path / "embeddings.parquet"
    spark_cfg = SparkConfig(master="local[2]", partitions=3, conf={"spark.driver.memory": "1g"})
    res = spark_extract(
        ext_dir, manifest, out, cfg, spark_cfg, metadata={"extractor_fingerprint": "fp"}
    )

    assert [p.name for p in shard_paths(out)] == [f"part-{i:05d}.parquet" for i in range(3)]
    ids, emb = load_embeddings(out)
    assert list(ids) == list(local.ids)  # manifest order across shards
    assert list(embedding_ids(out)) == list(ids)
    assert count_embeddings(out) == (len(local.ids), extractor.spec.embedding_dim)
    cosine = (emb * local.embeddings).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert embeddings_metadata(out) == {
        "embedding_dim": str(extractor.spec.embedding_dim),
        "extractor_fingerprint": "fp",
    }
    # the same failures, with the same reasons
    cols = [schema.IMAGE_ID, schema.REASON, schema.STAGE, schema.URI]
    key = schema.IMAGE_ID
    pd.testing.assert_frame_equal(
        res.failures[cols].sort_values(key).reset_index(drop=True),
        local.failures[cols].sort_values(key).reset_index(drop=True),
    )
    assert sorted(res.failures[key]) == ["corrupt", "gone"]
    m = res.metrics
    assert (m["n"], m["n_ok"], m["n_failed"]) == (25, 23, 2)
    assert m["spark_partitions"] == 3 and m["spark_shards"] == 3
    # the model is loaded once per Python worker, not once per partition
    assert m["spark_model_loads"] == m["spark_python_workers"] <= 2
    # pandas reads the folder of shards as one table too
    assert pd.read_parquet(out)["image_id"].tolist() == list(ids)
    with pytest.raises(ValueError, match="not empty"):
        spark_extract(ext_dir, manifest, out, cfg, spark_cfg)


@pytest.mark.slow
@pytest.mark.usefixtures("pyspark_present", "spark_session")
def test_extract_step_with_spark_engine_feeds_the_index_step(
    tmp_path: Path, mlflow_store: str
) -> None:
    """steps.extract with engine=spark logs a folder of shards that steps.index builds from."""
    import mlflow

    from steps import extract as extract_step
    from steps import index as index_step
    from steps.common import artifact_path, log_df

    manifest = _catalog(tmp_path, n=10)
    with mlflow.start_run() as pre_run:
        log_df(manifest, "manifest.parquet")
    overrides = {
        "extract.weights": "none",
        "extract.engine": "spark",
        "extract.batch_size": 4,
        "extract.spark.partitions": 2,
    }
    run_id = extract_step.run(pre_run.info.run_id, overrides=overrides)
    emb_path = artifact_path(run_id, "embeddings.parquet")
    assert emb_path.is_dir() and len(shard_paths(emb_path)) == 2
    ids, _ = load_embeddings(emb_path)
    assert len(ids) == 10
    run = mlflow.get_run(run_id)
    assert run.data.tags["imgsearch.extract.engine"] == "spark"
    assert run.data.metrics["n_failed"] == 2 and run.data.metrics["spark_partitions"] == 2
    failures = pd.read_parquet(artifact_path(run_id, "quarantine.parquet"))
    assert sorted(failures["image_id"]) == ["corrupt", "gone"]
    logged = pd.read_parquet(artifact_path(run_id, "manifest.parquet"))
    assert sorted(logged["image_id"]) == sorted(ids)

    index_run = index_step.run(run_id)
    metrics = mlflow.get_run(index_run).data.metrics
    assert metrics["count"] == 10 and metrics["shards"] == 2
    assert metrics["recall_at_10_vs_exact"] == 1.0


def test_spark_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SparkConfig(partitions=0)
    with pytest.raises(ConfigError):
        SparkConfig(threads_per_task="many")
    with pytest.raises(ConfigError):
        ExtractConfig(engine="dask")


def test_library_imports_without_pyspark_and_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError
    with pytest.raises(ConfigError, match=r"imgsearch\[spark\]"):
        spark_extract(tmp_path / "nope", pd.DataFrame({"image_id": [], "path": []}), tmp_path / "o")
