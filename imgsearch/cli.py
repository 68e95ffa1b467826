"""The ``imgsearch`` console command: a thin dispatcher to the tools that live outside the library.

``imgsearch search IMAGE [IMAGE ...] --k 10 ...`` runs :mod:`registry.search` (the same as
``python -m registry.search``). The library never imports MLflow, so the command's MLflow part
is imported lazily, by name, only when the command runs; it needs the repository checkout
(``registry/`` is not part of the installed package), found on ``sys.path`` or in the current
directory.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, str] = {"search": "registry.search"}


def _load(module: str) -> Callable[[Sequence[str] | None], int]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        root = Path.cwd()
        if exc.name != module.split(".")[0] or not (root / module.split(".")[0]).is_dir():
            raise SystemExit(
                f"imgsearch: cannot import {module} ({exc}); run this command from the "
                "imgsearch repository root"
            ) from exc
        sys.path.insert(0, str(root))
        mod = importlib.import_module(module)
    main: Callable[[Sequence[str] | None], int] = mod.main
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"usage: imgsearch {{{names}}} ...  (imgsearch search --help for options)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    return int(_load(COMMANDS[args[0]])(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
