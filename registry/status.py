"""``imgsearch status``: what is served now, and how good it is.

For each registered imgsearch model (extractor, index, text, attributes, reranker, as many as
exist): the versions behind the ``champion``, ``challenger`` and ``previous`` aliases, with the
headline test figures recorded on the version (``metric.*`` tags), the versions each depends on,
when it was promoted and the first line of its description. Read-only; exit 0 with a message
when nothing is registered yet, 2 when the registry cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

MODELS = (
    "imgsearch-extractor",
    "imgsearch-index",
    "imgsearch-text",
    "imgsearch-attributes",
    "imgsearch-reranker",
)
ALIASES = ("champion", "challenger", "previous")
HEADLINE = ("map_at_r", "hit_at_1", "hit_at_10", "map")
DEPENDS = ("extractor_version", "index_version")


def _row(name: str, alias: str, mv: Any) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    figures = {k: tags[f"metric.{k}"] for k in HEADLINE if f"metric.{k}" in tags}
    depends = {k: tags[k] for k in DEPENDS if k in tags}
    return {
        "model": name,
        "alias": alias,
        "version": str(mv.version),
        "figures": figures,
        "depends_on": depends,
        "promoted_at": tags.get("promoted_at", ""),
        "description": (mv.description or "").strip().splitlines()[0:1],
    }


def collect(client: Any) -> list[dict[str, Any]]:
    """One row per (model, alias) that exists, in :data:`MODELS` x :data:`ALIASES` order."""
    from registry.store import aliases, get_version

    rows = []
    for name in MODELS:
        found = aliases(client, name)
        for alias in ALIASES:
            if found and alias in found:
                rows.append(_row(name, alias, get_version(client, name, found[alias])))
    return rows


def _format(figures: dict[str, str]) -> str:
    def short(value: str) -> str:
        try:
            return f"{float(value):.3f}"
        except ValueError:
            return value

    return " ".join(f"{k}={short(v)}" for k, v in figures.items())


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        deps = " ".join(f"{k.removesuffix('_version')} v{v}" for k, v in r["depends_on"].items())
        line = f"{r['model']:<22} {r['alias']:<10} v{r['version']:<4} {_format(r['figures'])}"
        if deps:
            line += f"  (with {deps})"
        if r["promoted_at"]:
            line += f"  promoted {r['promoted_at']}"
        lines.append(line.rstrip())
        if r["description"]:
            lines.append(f"{'':<22} {r['description'][0][:100]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imgsearch status", description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    from mlflow import MlflowClient

    from registry.store import RegistryUnavailableError

    try:
        rows = collect(MlflowClient())
    except RegistryUnavailableError as exc:
        print(f"imgsearch status: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no imgsearch models are registered yet: run `make demo` (or `imgsearch run`)")
    else:
        print(render(rows))
    return 0
