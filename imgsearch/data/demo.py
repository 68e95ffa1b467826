"""Demo data: the same emoji drawn by several vendors, as a SQLite image catalog.

Each emoji is an item; each vendor's 64x64 drawing of it is an image, which makes a real
cross-style retrieval task. The drawings come from the npm packages
``emoji-datasource-<vendor>@16.0.0`` (fetched with ``npm pack`` at run time, never committed:
licences differ by vendor, Apple's is not for commercial use).

Layout of ``cache_dir`` (default ``home_dir()/data/emoji``)::

    npm/emoji-datasource-<vendor>-16.0.0.tgz     the packages as downloaded (kept: no re-download)
    <vendor>/package/emoji.json                  unpacked: the emoji list
    <vendor>/package/img/<vendor>/64/*.png       unpacked: the drawings (only this size)
    emoji-<vendors>-<limit|all>.sqlite           the catalog; uris are relative to cache_dir

The catalog uses the manifest's own column names, so ingest needs no column mapping::

    items(item_id = unified code point, item_name, category, subcategory, short_name, sort_order)
    images(image_id = "<vendor>/<unified>", item_id, uri, vendor)

Only base emoji are listed (skin-tone variations are not separate items). There are no download
or like counts in the packages, so the catalog has none: ingest leaves those columns empty.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsearch.config import home_dir
from imgsearch.data.demo_texts import (
    TEXT_LANGS,
    TEXT_PACKAGE,
    TEXT_VERSION,
    emoji_texts,
    unpack_texts,
)
from imgsearch.errors import CatalogError, ConfigError, FetchError

log = logging.getLogger(__name__)

PACKAGE = "emoji-datasource-{vendor}"
VERSION = "16.0.0"
VENDORS = ("google", "twitter", "facebook", "apple")
DEMO_TEXTS_TABLE = "texts"  # item_id, lang, kind (label | tag), text: emojibase-data, per language
IMAGE_DIR = (
    "img/{vendor}/64"  # inside the package; the other sizes and sprite sheets are not unpacked
)
NPM_TIMEOUT_S = 1800  # a package is 60-100 MB
_DONE = ".complete"

NPM_MISSING = (
    "npm (Node.js) is needed to fetch the demo emoji images, and it was not found on PATH. "
    "Install Node.js and npm (for example `apt-get install nodejs npm`, or see https://nodejs.org), "
    "or skip the demo and point ingest at your own catalog (configs/ingest.yaml: source sql|table|folder "
    "with url or path)."
)


@dataclass
class DemoConfig:
    """``vendors``: which drawings; ``limit``: how many emoji (``None``: all); ``cache_dir``: ``None`` for the default."""

    vendors: list[str] = field(default_factory=lambda: list(VENDORS))
    limit: int | None = None
    cache_dir: str | None = None
    text_langs: list[str] = field(default_factory=lambda: list(TEXT_LANGS))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.vendors) - set(VENDORS))
        if unknown or not self.vendors:
            raise ConfigError(f"demo.vendors: unknown {unknown}; choose from {list(VENDORS)}")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) < 1):
            raise ConfigError(f"demo.limit must be a positive integer or null, not {self.limit!r}")


def default_cache_dir() -> Path:
    return home_dir() / "data" / "emoji"


def demo_catalog(cfg: DemoConfig) -> Path:
    """The demo SQLite catalog of ``cfg`` (fetched when absent); its uris are relative to its folder."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return fetch_emoji(cache_dir, cfg.vendors, cfg.limit, cfg.text_langs)


def fetch_emoji(
    cache_dir: Path,
    vendors: Sequence[str] = VENDORS,
    limit: int | None = None,
    text_langs: Sequence[str] = (),
) -> Path:
    """Fetch (once), unpack (once) and write the SQLite catalog; returns its path.

    ``limit`` keeps ``limit`` emoji spread evenly over the packages' ``sort_order`` (which is
    grouped by category, so every large category is represented): positions
    ``floor(i * n / limit)`` for ``i < limit`` among the ``n`` emoji that have a drawing.

    Raises:
        FetchError: npm is missing, ``npm pack`` failed, or a package cannot be unpacked.
        CatalogError: a package's ``emoji.json`` is not what it should be.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    cfg = DemoConfig(vendors=list(vendors), limit=limit, cache_dir=str(cache_dir))  # validates
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = {}
    for vendor in cfg.vendors:
        tgz = npm_pack(f"{PACKAGE.format(vendor=vendor)}@{VERSION}", cache_dir / "npm")
        packages[vendor] = unpack(tgz, cache_dir / vendor, vendor)
    texts = {}
    if text_langs:
        tgz = npm_pack(f"{TEXT_PACKAGE}@{TEXT_VERSION}", cache_dir / "npm")
        texts = unpack_texts(tgz, cache_dir / TEXT_PACKAGE, text_langs)
    db_path = cache_dir / f"emoji-{'-'.join(cfg.vendors)}-{cfg.limit or 'all'}.sqlite"
    write_catalog(packages, cache_dir, db_path, cfg.limit, texts)
    return db_path


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack NAME@VERSION`` into ``dest``; skipped when the tarball is already there."""
    name, _, version = spec.rpartition("@")
    final = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if final.is_file():
        return final
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(NPM_MISSING)
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with npm pack (60-100 MB)", spec)
    # into a temporary folder first: an interrupted download must not look like a cached one
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pack-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", spec, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"npm pack {spec} failed: {exc}") from exc
        produced = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(produced) != 1:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise FetchError(
                f"npm pack {spec} failed (exit {proc.returncode}): {tail}\n"
                "Check the network access to the npm registry, or point ingest at your own catalog."
            )
        os.replace(produced[0], final)
    return final


def unpack(tgz: Path, dest: Path, vendor: str) -> Path:
    """Unpack ``package/emoji.json`` and the 64 px drawings of ``vendor``; returns ``dest/package``.

    Extraction uses tarfile's ``"data"`` filter (no absolute names, no ``..``, no links out, no
    device files) into a temporary folder renamed into place, so a crash leaves no half package.
    """
    package = dest / "package"
    if (dest / _DONE).is_file():
        return package
    prefix = f"package/{IMAGE_DIR.format(vendor=vendor)}/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            wanted = (m for m in tar if m.name == "package/emoji.json" or m.name.startswith(prefix))
            tar.extractall(tmp, members=wanted, filter="data")
        if not (tmp / "package" / "emoji.json").is_file():
            raise FetchError(
                f"{tgz.name} has no package/emoji.json: not an emoji-datasource package"
            )
        (tmp / _DONE).write_text(f"{tgz.name}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FetchError(f"cannot unpack {tgz} ({exc}); delete it to download it again") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return package


def _read_emoji(package: Path, vendor: str) -> list[dict[str, Any]]:
    try:
        data = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"cannot read {package / 'emoji.json'}: {exc}") from exc
    flag = f"has_img_{vendor}"
    needed = ("unified", "image", "category", "subcategory", "sort_order", flag)
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise CatalogError(f"{package / 'emoji.json'}: expected a list of objects")
    for entry in data:
        missing = [k for k in needed if k not in entry]
        if missing:
            raise CatalogError(
                f"{package / 'emoji.json'}: entry {entry.get('unified')!r} lacks {missing}"
            )
    return data


def select_emoji(
    entries: Sequence[Mapping[str, Any]], limit: int | None
) -> list[Mapping[str, Any]]:
    """Entries in ``sort_order``; with ``limit``, positions ``floor(i * n / limit)``, ``i < limit``."""
    ordered = sorted(entries, key=lambda e: (e["sort_order"], e["unified"]))
    if limit is None or limit >= len(ordered):
        return ordered
    return [ordered[(i * len(ordered)) // limit] for i in range(limit)]


def write_catalog(
    packages: Mapping[str, Path],
    data_root: Path,
    db_path: Path,
    limit: int | None = None,
    texts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, float]:
    """Write the SQLite catalog of the unpacked ``packages`` (vendor -> ``.../package``).

    uris are relative to ``data_root``. ``texts``: emojibase entries per language, written as
    the ``texts`` table (:mod:`imgsearch.data.demo_texts`; empty without). Replaces ``db_path``
    atomically. Returns counts and the text match rate per language.
    """
    data_root = Path(data_root).resolve()
    per_vendor = {vendor: _read_emoji(Path(pkg), vendor) for vendor, pkg in packages.items()}
    items: dict[str, Mapping[str, Any]] = {}
    drawn: dict[str, list[tuple[str, str]]] = {}  # unified -> [(vendor, uri)]
    for vendor, entries in per_vendor.items():
        image_dir = Path(packages[vendor]).resolve() / IMAGE_DIR.format(vendor=vendor)
        for entry in entries:
            if not entry[f"has_img_{vendor}"]:
                continue
            unified = str(entry["unified"])
            items.setdefault(unified, entry)
            uri = os.path.relpath(image_dir / str(entry["image"]), data_root)
            drawn.setdefault(unified, []).append((vendor, uri))
    chosen = select_emoji(list(items.values()), limit)

    db_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=db_path.parent, prefix=f".{db_path.name}-", suffix=".tmp")
    os.close(fd)
    n_images = 0
    try:
        with sqlite3.connect(tmp_name) as conn:
            conn.executescript(
                """
                CREATE TABLE items (
                    item_id TEXT PRIMARY KEY, item_name TEXT, category TEXT, subcategory TEXT,
                    short_name TEXT, sort_order INTEGER);
                CREATE TABLE images (
                    image_id TEXT PRIMARY KEY, item_id TEXT NOT NULL REFERENCES items(item_id),
                    uri TEXT NOT NULL, vendor TEXT NOT NULL);
                CREATE TABLE texts (
                    item_id TEXT NOT NULL REFERENCES items(item_id), lang TEXT NOT NULL,
                    kind TEXT NOT NULL, text TEXT NOT NULL);
                """
            )
            text_rows, stats = emoji_texts(texts or {}, [str(i["unified"]) for i in chosen])
            conn.executemany("INSERT INTO texts VALUES (?, ?, ?, ?)", text_rows)
            for item in chosen:
                unified = str(item["unified"])
                conn.execute(
                    "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        unified,
                        item.get("name") or item.get("short_name"),
                        item["category"],
                        item["subcategory"],
                        item.get("short_name"),
                        int(item["sort_order"]),
                    ),
                )
                rows = [(f"{v}/{unified}", unified, uri, v) for v, uri in drawn[unified]]
                conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?)", rows)
                n_images += len(rows)
        conn.close()
        os.replace(tmp_name, db_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("demo catalog %s: %d emoji, %d drawings", db_path, len(chosen), n_images)
    return {"n_items": len(chosen), "n_images": n_images, "n_texts": len(text_rows), **stats}
