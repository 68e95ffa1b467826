"""``imgsearch COMMAND``: one CLI for day-to-day use (issue #18, point 4).

Every command answers ``--help`` without importing MLflow; ``status`` reports the registered
versions and their figures; ``serve`` serves a registry-checked copy of the champion and works
without the venv on PATH (the ``uvicorn: not found`` failure of a bare ``mlflow models serve``).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imgsearch import cli
from registry import launch, status
from tests.search_env import SearchEnv, free_port, get_env, run_process, tracking
from tests.test_registry import fresh_tracking_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    e = get_env(tmp_path_factory)
    with tracking(e.uri):
        yield e


def test_usage_lists_every_command_and_refuses_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "search", "serve", "ui", "status", "drift", "daemon"):
        assert f"  {name} " in out
    assert cli.main(["serach"]) == 2
    assert "unknown command 'serach'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "ui", "status"])
def test_help_answers_without_importing_mlflow(command: str) -> None:
    probe = (
        "import sys\nfrom imgsearch import cli\ntry:\n"
        f"    cli.main([{command!r}, '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\nassert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"imgsearch {command}" in proc.stdout


def test_status_shows_the_champions_and_their_figures(
    env: SearchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status.main([]) == 0
    out = capsys.readouterr().out
    index_v = env.pair.index.version
    assert f"imgsearch-index        champion   v{index_v}" in out
    assert "imgsearch-extractor" in out and "(with extractor v" in out
    assert status.main(["--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    index = next(r for r in rows if r["model"] == "imgsearch-index" and r["alias"] == "champion")
    assert index["version"] == str(index_v)
    assert index["depends_on"]["extractor_version"] == str(env.pair.extractor.version)


def test_status_of_an_empty_registry_says_what_to_do(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tracking(fresh_tracking_uri(tmp_path_factory, tmp_path)):
        assert status.main([]) == 0
    assert "no imgsearch models are registered yet" in capsys.readouterr().out


def test_serve_runs_mlflow_on_a_checked_copy_with_the_venv_on_path(
    env: SearchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], server_env: dict[str, str]) -> int:
        model_dir = Path(cmd[cmd.index("serve") + 2])  # models serve -m DIR
        seen.update(cmd=cmd, path=server_env["PATH"], mlmodel=(model_dir / "MLmodel").is_file())
        return 0

    monkeypatch.setattr(launch, "run_group", fake_run)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert launch.serve(["--port", "5999"]) == 0
    cmd = seen["cmd"]
    assert isinstance(cmd, list) and cmd[:4] == [sys.executable, "-m", "mlflow", "models"]
    assert seen["mlmodel"] is True  # a local, verified copy: never the registry URI itself
    assert str(seen["path"]).split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert launch.serve(["--alias", "nope"]) == 2  # a missing alias: a message, no traceback


def test_imgsearch_serve_answers_with_the_venv_off_path(env: SearchEnv, tmp_path: Path) -> None:
    """The console command from another directory, PATH without the venv: the server starts
    (uvicorn found) and answers an image query."""
    port = free_port()
    exe = Path(sys.executable).with_name("imgsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "imgsearch.cli"]
    base = f"http://127.0.0.1:{port}"
    server_env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "MLFLOW_TRACKING_URI": env.uri,
        "MLFLOW_REGISTRY_URI": env.uri,
        "PYTHONPATH": str(ROOT),
    }
    with run_process(
        [*cmd, "serve", "--port", str(port)],
        url=base,
        ready_url=f"{base}/ping",
        log_path=tmp_path / "serve.log",
        cwd=tmp_path,
        env=server_env,
    ):
        png = base64.b64encode(env.images[2]).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": 1}}
        answer = requests.post(f"{base}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["image_id"] == "img2"
    assert "checked against the registry" in (tmp_path / "serve.log").read_text()
