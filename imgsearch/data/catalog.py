"""Ingest's shared parts: the config, the result, and turning catalog rows into a manifest.

Every source (:mod:`imgsearch.data.ingest` for SQL and tables, :mod:`imgsearch.data.ingest_folder`
for folder trees) ends in :func:`finish`, which normalises ids and uris, resolves paths inside the
data root and sends unusable rows to ``rejected`` with a reason. The rules are in the docstring of
:mod:`imgsearch.data.ingest`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imgsearch import schema as S
from imgsearch.errors import CatalogError, ConfigError, UnsafePathError
from imgsearch.paths import Resolver, path_to_str

log = logging.getLogger(__name__)

SOURCES = ("sql", "table", "folder")
STAGE = "ingest"
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
#: columns ingest or a later stage writes: a catalog column may not take these names
RESERVED = (S.PATH, S.SHA256, S.FORMAT, S.WIDTH, S.HEIGHT, S.FIXES, S.PHASH, S.PRE_PATH, S.SPLIT)
ITEM_CANONICAL = (S.ITEM_ID, *S.ITEM_ATTRIBUTES)
IMAGE_CANONICAL = S.REQUIRED_MANIFEST_COLUMNS
ALL_CANONICAL = (*S.REQUIRED_MANIFEST_COLUMNS, *S.ITEM_ATTRIBUTES)
MAX_NAMED = 10  # how many offending names an error message lists


@dataclass
class IngestConfig:
    """Where the catalog is and how its columns map onto the manifest.

    ``url``: SQLAlchemy URL (``sql``). ``path``: the CSV/Parquet file (``table``) or the folder
    (``folder``). ``data_root``: the folder uris are resolved in; ``None`` means the SQLite
    file's folder, the table file's folder, or the folder itself. ``item_columns`` /
    ``image_columns``: manifest column -> catalog column, for the items and images tables (a
    ``table`` source uses both, merged). ``filters``: manifest column -> value or list of values
    (rows kept when the column equals the value or is in the list; ``None`` matches empty).
    ``strict``: unmapped, non-canonical catalog columns are an error instead of passing through.
    ``db_schema``: database schema of the two tables (PostgreSQL ``public`` etc.).
    Item texts (:mod:`imgsearch.data.texts`): ``texts_table`` (a table of the SQL catalog),
    ``texts_path`` (a CSV/Parquet file, relative to the data root, for table/folder catalogs),
    ``text_columns`` (manifest column -> text kind) in language ``text_lang``, tags split on
    ``tag_separator``.
    """

    source: str = "sql"
    url: str | None = None
    path: str | None = None
    data_root: str | None = None
    items_table: str = "items"
    images_table: str = "images"
    item_columns: dict[str, str] = field(default_factory=dict)
    image_columns: dict[str, str] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    db_schema: str | None = None
    texts_table: str | None = None
    texts_path: str | None = None
    text_columns: dict[str, str] = field(default_factory=dict)
    text_lang: str = "en"
    tag_separator: str = ","

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"ingest.source must be one of {SOURCES}, not {self.source!r}")
        for name in ("item_columns", "image_columns", "filters", "text_columns"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, Mapping):
                raise ConfigError(f"ingest.{name} must be a mapping, not {type(value).__name__}")
        for name in ("item_columns", "image_columns"):
            for out, src in getattr(self, name).items():
                if not isinstance(out, str) or not isinstance(src, str) or not out or not src:
                    raise ConfigError(
                        f"ingest.{name}: {out!r} -> {src!r} must map a name to a name"
                    )
                if out in RESERVED:
                    raise ConfigError(f"ingest.{name}: {out!r} is written by the pipeline itself")


@dataclass
class IngestResult:
    """The manifest, the rows refused (quarantine schema) and figures; ``source`` describes the catalog."""

    manifest: pd.DataFrame
    rejected: pd.DataFrame
    metrics: dict[str, float]
    source: dict[str, str] = field(default_factory=dict)
    texts: pd.DataFrame | None = None  # item_id, lang, kind, text (imgsearch.data.texts)


# --- rows -> manifest ---------------------------------------------------------------------------


def data_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise CatalogError(f"data root not found: {path}")
    return path


def refuse_duplicates(names: Sequence[Any], where: str) -> None:
    dupes = sorted(str(n) for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise CatalogError(f"{where}: duplicated column names {dupes[:MAX_NAMED]}")


def plan_columns(
    available: Sequence[str],
    mapping: Mapping[str, str],
    *,
    canonical: Sequence[str],
    required: Sequence[str],
    strict: bool,
    where: str,
) -> dict[str, str]:
    """Manifest column -> catalog column, for one table. Raises CatalogError naming what is wrong."""
    refuse_duplicates(available, where)
    absent = sorted(f"{out}<-{src}" for out, src in mapping.items() if src not in available)
    if absent:
        raise CatalogError(
            f"{where}: mapped columns not found: {absent}; columns: {list(available)}"
        )
    plan = dict(mapping)
    used = set(mapping.values())
    for name in canonical:
        if name not in plan and name in available and name not in used:
            plan[name] = name
            used.add(name)
    missing = [name for name in required if name not in plan]
    if missing:
        raise CatalogError(
            f"{where}: missing required columns {missing}; map them with a column mapping "
            f"(for example {{{missing[0]!r}: <column>}}); columns: {list(available)}"
        )
    extra = [c for c in available if c not in used]
    if strict and extra:
        raise CatalogError(f"{where}: unknown columns {extra[:MAX_NAMED]} (strict mapping)")
    clash = [c for c in extra if c in plan or c in RESERVED]
    if clash:
        raise CatalogError(
            f"{where}: columns {clash} clash with manifest columns; map them to other names "
            "(for example {'source_width': 'width'}) or map the manifest column to them"
        )
    plan.update({c: c for c in extra})
    return plan


def filter_frame(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """The pandas twin of SQL filters (:mod:`imgsearch.data.ingest`) for table and folder sources."""
    if not filters:
        return frame
    keep = pd.Series(True, index=frame.index)
    for name, value in filters.items():
        if name not in frame.columns:
            raise ConfigError(
                f"ingest.filters: unknown column {name!r}; columns: {list(frame.columns)}"
            )
        if isinstance(value, Mapping):
            raise ConfigError(f"ingest.filters: a value must be a scalar or a list, not {value!r}")
        values = list(value) if isinstance(value, list | tuple | set) else [value]
        column = frame[name]
        if name in S.REQUIRED_MANIFEST_COLUMNS:  # ids are text in the manifest
            values = [None if v is None else str(v) for v in values]
            column = column.astype("string")
        match = column.isin([v for v in values if v is not None])
        if None in values:
            match |= column.isna()
        keep &= match.fillna(False).astype(bool)
    return frame[keep]


def clean_text(text: str) -> str:
    """``text`` as valid UTF-8 (Parquet needs it): undecodable bytes become ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def as_text(value: Any) -> str | None:
    """A catalog id/uri as text; ``None`` when empty."""
    if value is None or (not isinstance(value, str | bytes) and pd.isna(value)):
        return None
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer id that went through a float column (NaN elsewhere)
    text = str(value)
    return text if text.strip() else None


def reject(where: Mapping[str, Any], reason: str, detail: str) -> dict[str, object]:
    return {
        S.IMAGE_ID: where.get(S.IMAGE_ID),
        S.ITEM_ID: where.get(S.ITEM_ID),
        S.URI: where.get(S.URI),
        S.STAGE: STAGE,
        S.REASON: reason,
        S.DETAIL: detail,
    }


def finish(
    frame: pd.DataFrame,
    data_root: Path,
    rejected: list[dict[str, object]],
    *,
    filtered: bool = False,
) -> IngestResult:
    """Normalise ids and uris, refuse duplicates, resolve paths, add absent attributes as NA.

    Raises :class:`CatalogError` on duplicate ids, and when no image is left although no filter
    chose to leave rows out (``filtered``): an empty catalog would otherwise pass validate, EDA
    and split and only fail at ``index``, far from its cause.
    """
    frame = frame.reset_index(drop=True)
    ids = frame[S.IMAGE_ID].map(as_text)
    items = frame[S.ITEM_ID].map(as_text)
    uris = frame[S.URI].map(as_text)  # raw: bytes that are not UTF-8 still name their file
    rejected = list(rejected)

    dupes = ids[ids.notna() & ids.duplicated(keep=False)].unique().tolist()
    if dupes:
        raise CatalogError(f"duplicate image ids ({len(dupes)}): {sorted(dupes)[:MAX_NAMED]}")
    clean = pd.DataFrame(
        {
            S.IMAGE_ID: ids.map(clean_text, na_action="ignore"),
            S.ITEM_ID: items.map(clean_text, na_action="ignore"),
            S.URI: uris.map(path_to_str, na_action="ignore"),
        }
    )
    # escaping is not injective: a non-UTF-8 name and a real name spelled like its escape
    ambiguous = _ambiguous(ids, clean[S.IMAGE_ID]) | _ambiguous(items, clean[S.ITEM_ID])

    resolver = Resolver(data_root)
    keep: list[int] = []
    paths: list[str] = []
    for pos, (image_id, item_id, uri) in enumerate(zip(ids, items, uris, strict=True)):
        row = clean.iloc[pos].to_dict()
        if image_id is None or item_id is None or uri is None:
            empty = [
                c for c, v in zip(clean.columns, (image_id, item_id, uri), strict=True) if v is None
            ]
            rejected.append(reject(row, "missing_value", f"empty {', '.join(empty)}"))
            continue
        if ambiguous[pos]:
            detail = (
                "the name is not UTF-8 and its escaped form is also the name of another "
                f"image or item ({row[S.IMAGE_ID]!r} in item {row[S.ITEM_ID]!r}): rename one"
            )
            rejected.append(reject(row, "ambiguous_id", detail))
            continue
        try:
            paths.append(path_to_str(resolver.resolve_bytes(uri)))
        except UnsafePathError as exc:
            rejected.append(reject(row, "unsafe_path", str(exc)))
            continue
        keep.append(pos)

    manifest = _manifest(frame, clean, keep, paths)
    rejected_df = S.quarantine_rows(rejected)
    reasons = Counter(str(r[S.REASON]) for r in rejected)
    if manifest.empty and not filtered:
        if len(frame):
            found = f"{len(frame)} rows, all rejected: {dict(reasons)}"
        else:
            found = (
                f"no rows; {len(rejected)} entries rejected: {dict(reasons)}"
                if rejected
                else "no rows"
            )
        hint = (
            ": a folder catalog is one folder per item (<folder>/<item>/<images>); put each "
            "item's images in a folder named after it, or each image in a folder of its own"
            if reasons.get("no_item")
            else ""
        )
        raise CatalogError(f"the catalog has no usable images ({found}); nothing to ingest{hint}")
    metrics = {
        "n_items": float(manifest[S.ITEM_ID].nunique()),
        "n_images": float(len(manifest)),
        "n_rejected": float(len(rejected_df)),
    }
    for reason, count in reasons.items():
        metrics[f"n_rejected_{reason}"] = float(count)
    if manifest.empty:
        log.warning("ingest: the filters left no images (%d rejected)", len(rejected_df))
    log.info(
        "ingest: %d images of %d items, %d rejected",
        len(manifest),
        manifest[S.ITEM_ID].nunique(),
        len(rejected_df),
    )
    return IngestResult(manifest=manifest, rejected=rejected_df, metrics=metrics)


def _ambiguous(raw: pd.Series, clean: pd.Series) -> pd.Series:
    """Rows whose name was escaped (not UTF-8) into a value that another raw name also gives."""
    known = raw.notna()
    n_raw = raw[known].groupby(clean[known]).transform("nunique")
    clashing = n_raw.reindex(raw.index, fill_value=0).gt(1)
    return (known & clashing & (raw != clean)).astype(bool)


def _manifest(
    frame: pd.DataFrame, clean: pd.DataFrame, keep: list[int], paths: list[str]
) -> pd.DataFrame:
    """The kept rows with clean ids, their paths, absent attributes as NA, sorted by image id."""
    manifest = frame.iloc[keep].reset_index(drop=True)
    for name in clean.columns:
        manifest[name] = clean[name].iloc[keep].to_numpy()
    manifest[S.PATH] = paths
    for name in S.ITEM_ATTRIBUTES:
        if name not in manifest.columns:
            manifest[name] = pd.Series(pd.NA, index=manifest.index, dtype="object")
    first = [*S.REQUIRED_MANIFEST_COLUMNS, S.PATH, *S.ITEM_ATTRIBUTES]
    manifest = manifest[first + [c for c in manifest.columns if c not in first]]
    return manifest.sort_values(S.IMAGE_ID, kind="stable").reset_index(drop=True)
