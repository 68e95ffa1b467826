"""Fetch the demo data: emoji drawn by several vendors, as a SQLite catalog. Prints its path.

Inputs: ``configs/demo.yaml`` (``--limit`` overrides it). Needs Node.js/npm the first time
(``npm pack emoji-datasource-<vendor>@16.0.0``, 60-100 MB per vendor); later runs reuse the cache.
A plain script: no MLflow run (``steps.ingest`` records what it reads).
"""

from __future__ import annotations

import os
import sys

from imgsearch.config import from_dict, load_config
from imgsearch.data.demo import DemoConfig, demo_catalog
from imgsearch.errors import ImgsearchError
from steps.common import PROFILE_ENV, Option, cli


def run(limit: int | None = None, profile: str | None = None) -> str:
    cfg = load_config(profile or os.environ.get(PROFILE_ENV) or None, {"demo.limit": limit})
    return str(demo_catalog(from_dict(DemoConfig, cfg.get("demo"))))


OPTIONS = (Option("--limit", "number of emoji (default: config)", default=None, type=int),)


def main() -> None:
    try:
        cli(run, __doc__, OPTIONS)
    except ImgsearchError as exc:
        sys.exit(f"fetch_demo: {exc}")


if __name__ == "__main__":
    main()
