"""A tiny registered ``imgsearch-index@champion`` in a temporary tracking store, for the search
CLI, feedback and page tests.

Six synthetic PNGs on disk (so the catalog has paths and thumbnails), three items, two
categories, popularity columns and an NSFW flag, indexed with a random-init 64 px MobileNetV2.
Registered and promoted once per test session (``get_env``), whichever module asks first.

:func:`serve_model` runs ``mlflow models serve`` of that champion for real and :func:`run_process`
starts any such server (the Streamlit page too) and waits until it answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from mlflow import MlflowClient

from imgsearch.config import config_dir
from imgsearch.data.imageio import open_rgb
from imgsearch.embed.text_query import TextQueryEncoder
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.models.heads import HeadSpec, Projection
from imgsearch.models.text import make_text_tower
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.query import embed_images
from imgsearch.search.ranking import RankingConfig
from registry import text_queries as tq
from registry.promote import promote
from registry.register import INDEX_MODEL, RegisterConfig, RegisteredPair, register_pair
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
    text_artifacts = _text_parts(root, fingerprint(ext), emb.shape[1])

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tracking(uri):
        exp = mlflow.create_experiment("search-tests", artifact_location=(root / "art").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            # this run stands for the extract, index and evaluate runs: the gate traces the
            # recorded figure to the evaluation of the version's own runs
            mlflow.set_tag("imgsearch.input.extract_run_id", run.info.run_id)
            mlflow.log_metric("map_at_r", 0.5)
            pair = register_pair(
                ext_dir,
                root / "index",
                RankingConfig(),
                metrics={"map_at_r": 0.5},
                extra_tags={"evaluate_run_id": run.info.run_id},
                cfg=RegisterConfig(),
                client=client,
                text_artifacts=text_artifacts,
            )
        assert promote(client, smoke=False).promoted
    return SearchEnv(uri, root, images, paths, meta, pair)


#: the text side of the test index: words of the two categories, "cat"/"кошка" near the cats
TEXTS = ["cat", "кошка", "kitten", "dog", "собака", "puppy", "thing", "animal", "pet", "house"]


def _text_parts(root: Path, extractor_fp: str, dim: int) -> dict[str, Path]:
    """A text encoder (ngram tower + a seeded projection), the demo policy and one flagged
    image (img5), as the align step would log them."""
    tower = make_text_tower("ngram", dim=8)
    tower.fit(TEXTS * 3)
    torch.manual_seed(0)
    encoder = TextQueryEncoder(tower, Projection(HeadSpec("linear", tower.dim, dim)), extractor_fp)
    encoder.save(root / tq.ARTIFACT_TEXT)
    (root / tq.ARTIFACT_POLICY).mkdir()
    shutil.copyfile(config_dir() / "restricted.yaml", root / tq.ARTIFACT_POLICY / tq.POLICY_FILE)
    (root / tq.ARTIFACT_FLAGS).mkdir()
    pd.DataFrame({"image_id": ["img5"], "score": [0.9], "flagged": [True]}).to_parquet(
        root / tq.ARTIFACT_FLAGS / tq.FLAGS_FILE
    )
    return {name: root / name for name in tq.TEXT_ARTIFACTS}


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


# --- real servers ---------------------------------------------------------------------------------

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_tool(name: str) -> list[str]:
    """A console script of this interpreter's environment (``mlflow``, ``streamlit``)."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", name]


@dataclass
class Running:
    """A started server: its base URL, the URL that answers 200 once it is up, its log."""

    url: str
    ready_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Running:
        """Block until ``ready_url`` answers 200; fails the test (with the log's tail) when the
        process exits first or does not come up in ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.url}: exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.url}: not up after {timeout_s:.0f}s:\n{self.log()}")
            time.sleep(0.5)

    def log(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@contextlib.contextmanager
def run_process(
    cmd: Sequence[str],
    *,
    url: str,
    ready_url: str,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str],
    wait: bool = True,
) -> Iterator[Running]:
    """Start ``cmd`` in its own process group (optionally waiting until it is up) and stop the
    whole group (SIGTERM, then SIGKILL) afterwards. ``wait=False`` lets a caller start several
    servers first and then :meth:`Running.wait` for each."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Running(url, ready_url, proc, log_path)
    try:
        if wait:
            running.wait()
        yield running
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc``'s process group (the server and its workers), politely first."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve_model(
    uri: str,
    workdir: Path,
    model_uri: str = f"models:/{INDEX_MODEL}@champion",
    *,
    wait: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Running]:
    """``mlflow models serve`` of ``model_uri`` from the store ``uri``, started from ``workdir``
    (outside the repository, with ``PYTHONPATH`` empty: the model's own ``code_paths`` must be
    enough). Yields the :class:`Running` server; stopped afterwards. Log: ``workdir/server.log``."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        # the scoring server is started with `uvicorn` from PATH: use this interpreter's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": "",
        **(extra_env or {}),
    }
    cmd = [
        *venv_tool("mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-p",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    base = f"http://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    with run_process(
        cmd,
        url=base,
        ready_url=f"{base}/ping",
        log_path=workdir / "server.log",
        cwd=workdir,
        env=env,
        wait=wait,
    ) as running:
        yield running


def env_removing(tmp_path_factory: pytest.TempPathFactory, model_name: str) -> Iterator[SearchEnv]:
    """The shared search env for a module that registers ``model_name`` (a reranker, say); the
    registered model is deleted afterwards, so other modules' page and CLI tests see the
    first-stage ranking they expect."""
    env = get_env(tmp_path_factory)
    yield env
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.delete_registered_model(model_name)
