"""A tiny registered ``imgsearch-index@champion`` in a temporary tracking store, for the search
CLI, feedback and page tests.

Six synthetic PNGs on disk (so the catalog has paths and thumbnails), three items, two
categories, popularity columns and an NSFW flag, indexed with a random-init 64 px MobileNetV2.
Registered and promoted once per test session (``get_env``), whichever module asks first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from imgsearch.backbones import fingerprint, load_extractor
from imgsearch.extract import embed_images
from imgsearch.imageio import open_rgb
from imgsearch.index import ImageIndex, IndexConfig
from imgsearch.ranking import RankingConfig
from registry.promote import promote
from registry.register import RegisterConfig, RegisteredPair, register_pair
from tests.test_registry import fresh_tracking_uri, make_extractor_dir, png_bytes

N_IMAGES = 6


@dataclass
class SearchEnv:
    uri: str
    root: Path
    images: list[bytes]
    paths: list[Path]
    meta: pd.DataFrame
    pair: RegisteredPair


_ENV: list[SearchEnv] = []


def _build(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    root = tmp_path_factory.mktemp("search")
    uri = fresh_tracking_uri(tmp_path_factory, root)
    images = [png_bytes(100 + i) for i in range(N_IMAGES)]
    gallery = root / "gallery"
    gallery.mkdir()
    paths = []
    for i, data in enumerate(images):
        path = gallery / f"img{i}.png"
        path.write_bytes(data)
        paths.append(path)
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(N_IMAGES)],
            "item_id": [f"item{i // 2}" for i in range(N_IMAGES)],
            "item_name": [f"thing {i // 2}" for i in range(N_IMAGES)],
            "category": ["cats" if i < 4 else "dogs" for i in range(N_IMAGES)],
            "downloads": [10 * (i + 1) for i in range(N_IMAGES)],
            "likes": [i for i in range(N_IMAGES)],
            "nsfw": [i == 5 for i in range(N_IMAGES)],
            "path": [str(p) for p in paths],
        }
    )
    ext_dir = make_extractor_dir(root / "extractor", seed=0)
    ext = load_extractor(ext_dir)
    emb = embed_images(ext, [open_rgb(b) for b in images])
    index = ImageIndex.build(emb, meta, IndexConfig(factory="Flat"), fingerprint(ext))
    index.save(root / "index")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tracking(uri):
        exp = mlflow.create_experiment("search-tests", artifact_location=(root / "art").as_uri())
        with mlflow.start_run(experiment_id=exp):
            pair = register_pair(
                ext_dir,
                root / "index",
                RankingConfig(),
                metrics={"map_at_r": 0.5},
                cfg=RegisterConfig(),
                client=client,
            )
        assert promote(client, smoke=False).promoted
    return SearchEnv(uri, root, images, paths, meta, pair)


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """Point MLflow's default client at ``uri`` for the duration (restored afterwards)."""
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])


def get_env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    if not _ENV:
        _ENV.append(_build(tmp_path_factory))
    return _ENV[0]
