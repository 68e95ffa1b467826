"""``imgsearch serve`` and ``imgsearch ui``: MLflow's own servers, started so they work however
the command is run.

``mlflow models serve`` starts ``uvicorn`` from PATH, so the Makefile's command copied as
``.venv/bin/mlflow models serve ...`` dies with ``exec: uvicorn: not found`` unless the venv is
active. Both commands here put the running interpreter's ``bin`` folder first on PATH.

``serve`` never hands MLflow a registry URI: it resolves ``models:/<name>@<alias>`` through the
registry, downloads that version and checks it against the checksums in its version tags
(:func:`registry.integrity.download_verified`), then serves the checked copy. A tampered or
unchecksummed version is refused before any of its code runs. The copy is removed when the
server stops. Into that copy it bundles ``imgsearch-reranker@champion`` when that reranker was
trained for the served index version (``--no-reranker``: not; :mod:`registry.served_rerank`)
and the heads of ``imgsearch-attributes@champion`` when they were trained on its extractor
version (``--no-attributes``: not; :mod:`registry.bundled_attributes`), and it pins the registry's file checksums into the copy's config, so the model checks each file
again right before parsing it.

``ui`` runs ``mlflow ui`` on the tracking store (``$MLFLOW_TRACKING_URI``, which the ``imgsearch``
command defaults to the checkout's ``mlflow.db``).

The servers run in their own process group; Ctrl-C or SIGTERM stops the whole group (MLflow
starts worker processes that would otherwise be left behind).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

INDEX_MODEL = "imgsearch-index"  # registry.tags.INDEX_MODEL, without importing mlflow for --help


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this interpreter's ``bin`` folder first on PATH."""
    out = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in out.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    out["PATH"] = os.pathsep.join([bin_dir, *parts])
    return out


def mlflow_command(*args: str) -> list[str]:
    """``mlflow ARGS`` through this interpreter, so the venv's MLflow runs whatever PATH says."""
    return [sys.executable, "-m", "mlflow", *args]


def serve_command(model_dir: Path, host: str, port: int, workers: int) -> list[str]:
    return mlflow_command(
        "models", "serve", "-m", str(model_dir), "--env-manager", "local",
        "--host", host, "-p", str(port), "-w", str(workers),
    )  # fmt: skip


def run_group(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run ``cmd`` in its own process group until it exits; SIGINT/SIGTERM stop the group."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("stopping (signal %d)", signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # workers left by a server that died alone
        except ProcessLookupError:
            pass


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgsearch serve",
        description="Serve search over HTTP (POST images or texts to /invocations), from the "
        "registered index model, checked against the registry's checksums first.",
    )
    p.add_argument("--name", default=INDEX_MODEL, help="registered model (default: %(default)s)")
    p.add_argument("--alias", default="champion", help="alias to serve (default: %(default)s)")
    p.add_argument("--version", default=None, help="a version number instead of the alias")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=5001, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (default: 1)")
    p.add_argument(
        "--reranker-alias",
        default="champion",
        help="rerank with imgsearch-reranker@ALIAS when it was trained for the served index "
        "version (default: %(default)s)",
    )
    p.add_argument("--no-reranker", action="store_true", help="serve the first-stage ranking alone")
    p.add_argument(
        "--attributes-alias",
        default="champion",
        help="add the query image's predicted attributes from imgsearch-attributes@ALIAS when "
        "it was trained on the served index's extractor version (default: %(default)s)",
    )
    p.add_argument(
        "--no-attributes", action="store_true", help="no predicted attributes in the answer"
    )
    return p


def serve(argv: Sequence[str] | None = None) -> int:
    args = _serve_parser().parse_args(argv)
    from registry.integrity import ArtifactIntegrityError, download_verified

    uri = (
        f"models:/{args.name}/{args.version}"
        if args.version
        else f"models:/{args.name}@{args.alias}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-serve-"))
    try:
        try:
            local, files = download_verified(uri, tmp)
        except ArtifactIntegrityError as exc:
            print(f"imgsearch serve: refused: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - a missing model/alias: say which, no traceback
            print(f"imgsearch serve: cannot load {uri}: {exc}", file=sys.stderr)
            return 2
        for line in _prepare(local, files, args):
            print(f"imgsearch serve: {line}", file=sys.stderr)
        print(
            f"imgsearch serve: {uri} checked against the registry; "
            f"http://{args.host}:{args.port}/invocations",
            file=sys.stderr,
        )
        return run_group(serve_command(local, args.host, args.port, args.workers), server_env())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(local: Path, files: dict[str, str], args: argparse.Namespace) -> list[str]:
    """Bundle the reranker and attribute heads of the served index version into the copy (or
    say why not) and pin the copy's checksums into its config (:mod:`registry.served_rerank`)."""
    from registry import served_rerank as sr

    if args.name != INDEX_MODEL:
        sr.pin_checksums(local, files)
        return []
    return sr.prepare_copy(
        local,
        files,
        reranker_alias=None if args.no_reranker else args.reranker_alias,
        attributes_alias=None if args.no_attributes else args.attributes_alias,
    )


def ui(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="imgsearch ui", description="The MLflow UI on the tracking store."
    )
    p.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    args = p.parse_args(argv)
    store = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    print(f"imgsearch ui: {store} on http://{args.host}:{args.port}", file=sys.stderr)
    cmd = mlflow_command(
        "ui", "--backend-store-uri", store, "--host", args.host, "--port", str(args.port)
    )
    return run_group(cmd, server_env())
