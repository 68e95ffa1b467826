"""End to end: ``mlflow models serve`` of ``models:/imgsearch-index@champion`` answers image queries.

The server runs as a subprocess (``--env-manager local``) from a working directory outside the
repository, so the model must bring its own code (``code_paths``). Garbage gets a 4xx with a
reason, and the server keeps answering.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from imgsearch.ranking import RankingConfig
from registry import models
from registry.promote import promote
from registry.register import INDEX_MODEL, RegisterConfig, register_pair
from tests.test_registry import fresh_tracking_uri, make_extractor_dir, make_index_dir, png_bytes

STARTUP_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_cli() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[bytes]]]:
    root = tmp_path_factory.mktemp("serve")
    uri = fresh_tracking_uri(tmp_path_factory, root)
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    proc: subprocess.Popen[bytes] | None = None
    log_path = root / "server.log"
    try:
        images = [png_bytes(i) for i in range(6)]
        ext_dir = make_extractor_dir(root / "extractor", seed=0)
        index_dir = make_index_dir(root / "index", ext_dir, images)
        exp = mlflow.create_experiment(
            "serve-tests", artifact_location=(root / "artifacts").as_uri()
        )
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with mlflow.start_run(experiment_id=exp):
            register_pair(
                ext_dir,
                index_dir,
                RankingConfig(),
                metrics={"map_at_r": 0.5},
                cfg=RegisterConfig(),
                client=client,
            )
        assert promote(client, smoke=False).promoted

        port = _free_port()
        workdir = root / "elsewhere"
        workdir.mkdir()
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_REGISTRY_URI": uri,
            # the scoring server is started with `uvicorn` from PATH: use this interpreter's
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": "",  # the model's own code_paths must be enough
        }
        cmd = [
            *_mlflow_cli(),
            "models",
            "serve",
            "-m",
            f"models:/{INDEX_MODEL}@champion",
            "--env-manager",
            "local",
            "-p",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not up after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(1.0)
        yield base, images
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(
                proc.pid, signal.SIGTERM
            )  # the server's own process group (uvicorn child too)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
        shutil.rmtree(root / "artifacts", ignore_errors=True)


def _invoke(base: str, payload: dict | str) -> requests.Response:
    kwargs = {"json": payload} if isinstance(payload, dict) else {"data": payload}
    return requests.post(
        f"{base}/invocations", headers={"Content-Type": "application/json"}, timeout=60, **kwargs
    )


def test_served_index_ranks_a_png_and_survives_garbage(served: tuple[str, list[bytes]]) -> None:
    base, images = served
    png = base64.b64encode(images[4]).decode()
    ok = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": 3}}
    )
    assert ok.status_code == 200, ok.text
    rows = ok.json()["predictions"]
    assert len(rows) == 3
    assert set(models.RESULT_COLUMNS) | {models.ERROR} <= set(rows[0])
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["image_id"] == "img4" and rows[0]["item_id"] == "item2"
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["error"] is None

    # a batch in the "inputs" format, one bad image among good ones: answered per query
    bad = base64.b64encode(b"GIF89a truncated").decode()
    mixed = _invoke(base, {"inputs": {"image": [bad, png]}, "params": {"k": 2}})
    assert mixed.status_code == 200, mixed.text
    by_query: dict[int, list[dict]] = {}
    for row in mixed.json()["predictions"]:
        by_query.setdefault(row["query"], []).append(row)
    assert by_query[0][0]["error"] and by_query[0][0]["image_id"] is None
    assert [r["image_id"] for r in by_query[1]][0] == "img4"

    garbage = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}
    )
    assert 400 <= garbage.status_code < 500
    assert "no usable image" in garbage.json()["message"]
    not_json = _invoke(base, "this is not json")
    assert 400 <= not_json.status_code < 500
    bad_k = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": -1}}
    )
    assert 400 <= bad_k.status_code < 500 and "k must be" in bad_k.json()["message"]

    again = _invoke(base, {"dataframe_records": [{"image": png}], "params": {"k": 1}})
    assert again.status_code == 200 and again.json()["predictions"][0]["image_id"] == "img4"
