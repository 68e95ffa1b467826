"""The ``imgsearch`` console command: one CLI for day-to-day use, a thin dispatcher to the tools
that live outside the library (the MLflow entry points stay as they are).

=========== ======================================= ===========================================
command     runs                                    what
=========== ======================================= ===========================================
``run``     :mod:`steps.main`                       the whole pipeline (``--limit``, ``--profile``...)
``search``  :mod:`registry.search`                  search by image and/or words
``serve``   :func:`registry.launch.serve`           HTTP serving of the champion, checksums checked
``ui``      :func:`registry.launch.ui`              the MLflow UI on the tracking store
``status``  :mod:`registry.status`                  champion/challenger versions and their figures
``drift``   :mod:`monitoring.drift`                 a drift report between two extract runs
``daemon``  :mod:`monitoring.daemon`                the continuous-improvement scheduler
=========== ======================================= ===========================================

The library never imports MLflow, so each command's module is imported lazily, by name, only
when the command runs; ``imgsearch --help`` imports nothing.

``registry/`` is not part of the installed package (only ``imgsearch`` is), so the command needs
the project checkout. It is found, first match wins, at:

1. ``$IMGSEARCH_PROJECT`` (an error if that folder is not an imgsearch checkout);
2. the checkout the installed ``imgsearch`` package lives in (an editable ``pip install -e .``);
3. the current directory.

The checkout goes first on ``sys.path``, and when ``MLFLOW_TRACKING_URI`` is unset the tracking
and registry store default to the checkout's own ``mlflow.db`` (what ``make demo`` and
``python -m steps...`` run from the checkout write to), so the command works from any directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from imgsearch.config import PROJECT_ROOT

#: command -> ("module" or "module:function", one-line help). The function reads ``sys.argv``.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("steps.main", "run the whole pipeline (ingest ... promote) as one MLflow run"),
    "search": ("registry.search", "search by image and/or words with the champion"),
    "serve": ("registry.launch:serve", "serve the champion over HTTP (checksums checked first)"),
    "ui": ("registry.launch:ui", "open the MLflow UI on the tracking store"),
    "status": ("registry.status", "champion / challenger versions and their test figures"),
    "drift": ("monitoring.drift", "drift report: new images against the reference"),
    "daemon": ("monitoring.daemon", "the scheduler: fine-tune, re-index, evaluate, promote"),
}
PROJECT_ENV = "IMGSEARCH_PROJECT"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
#: A folder is an imgsearch checkout when it holds this file.
MARKER = Path("registry") / "search.py"
DB_FILE = "mlflow.db"


class ProjectNotFound(RuntimeError):
    """No imgsearch checkout (the folder holding ``registry/``) where the command looked."""


def is_project(path: Path) -> bool:
    return (path / MARKER).is_file()


def find_project(env: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The imgsearch checkout to run from (see the module docstring for the order)."""
    env = dict(os.environ if env is None else env)
    configured = env.get(PROJECT_ENV, "").strip()
    if configured:
        root = Path(configured).expanduser().resolve()
        if not is_project(root):
            raise ProjectNotFound(
                f"{PROJECT_ENV}={configured} is not an imgsearch checkout (no {MARKER} there)"
            )
        return root
    candidates = [PROJECT_ROOT, (cwd or Path.cwd()).resolve()]
    for root in candidates:
        if is_project(root):
            return root
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ProjectNotFound(
        f"cannot find the imgsearch checkout (a folder holding {MARKER}); looked in {looked}. "
        f"Install it editable (pip install -e /path/to/imgsearch) or set "
        f"{PROJECT_ENV}=/path/to/imgsearch"
    )


def default_tracking_uri(root: Path) -> str:
    """The checkout's own store: ``sqlite:///<root>/mlflow.db`` (an absolute path)."""
    return f"sqlite:///{(root / DB_FILE).resolve()}"


def prepare(root: Path, env: dict[str, str] | None = None) -> None:
    """Make ``registry`` importable from ``root`` and default the tracking store to its DB."""
    target = os.environ if env is None else env
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not target.get(TRACKING_ENV):
        target[TRACKING_ENV] = default_tracking_uri(root)


def _load(target: str) -> Callable[[], object]:
    try:
        root = find_project()
    except ProjectNotFound as exc:
        raise SystemExit(f"imgsearch: {exc}") from exc
    prepare(root)
    module, _, function = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"imgsearch: cannot import {module} from {root} ({exc})") from exc
    main: Callable[[], object] = getattr(mod, function or "main")
    return main


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: imgsearch COMMAND [options]   (imgsearch COMMAND --help)\n\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        if args and args[0] not in ("-h", "--help"):
            print(f"imgsearch: unknown command {args[0]!r}", file=sys.stderr)
        print(usage())
        return 0 if args and args[0] in ("-h", "--help") else 2
    command = load_command(args[0])
    saved = sys.argv
    sys.argv = [f"imgsearch {args[0]}", *args[1:]]  # each command parses sys.argv
    try:
        return int(command() or 0)  # type: ignore[call-overload]
    finally:
        sys.argv = saved


def load_command(name: str) -> Callable[[], object]:
    return _load(COMMANDS[name][0])


if __name__ == "__main__":
    sys.exit(main())
