"""Ingest: read an image catalog into one manifest (one row per image).

Three kinds of catalog give the same manifest for the same collection:

- ``sql``: any SQLAlchemy URL (SQLite by default). An items table and an images table joined on the
  item id (a LEFT join from images, so an image whose item row is missing is kept, with empty item
  attributes, and counted in ``n_orphan_images``). Table and column names are checked against the
  reflected schema and filter values are bound parameters: nothing from the config is formatted
  into SQL text.
- ``table``: a CSV/TSV or Parquet file with one row per image.
- ``folder``: one folder per item (``item_id`` = the folder name, ``image_id`` = the path relative to
  the folder); every non-hidden regular file is listed, whatever its extension (validation decides
  what is an image).

Column mappings name, for each manifest column, the catalog column it comes from
(``{"item_id": "model_id", "uri": "path"}``); an unmapped manifest column is taken from a catalog
column of the same name when there is one. Item attributes the catalog lacks become empty (NA)
columns, never invented values. Other catalog columns pass through as attributes unless
``strict=True``, which makes them an error. Every ``uri`` is resolved inside the data root by
:func:`imgsearch.paths.resolve_within`; rows that cannot be used go to ``rejected`` (quarantine
schema, ``stage="ingest"``) with a reason, never dropped silently:

- ``unsafe_path``: the uri escapes the data root (``../``, absolute elsewhere, symlink out, loop);
- ``missing_value``: ``image_id``, ``item_id`` or ``uri`` is empty;
- ``no_item``: (folder) a file directly in the folder, outside any item folder;
- ``not_a_file``: (folder) a FIFO, socket or device;
- ``duplicate_folder``: (folder) a symlinked folder whose target was already listed.

Rows left out by ``filters`` are a choice, not a rejection. Malformed catalogs raise
:class:`CatalogError`: missing required columns, duplicated column names, duplicate image ids,
unknown columns when strict, catalog columns that clash with manifest columns.

Ids become text (``101``, ``"007"`` stay as written). The manifest is sorted by ``image_id``.
Text that is not UTF-8 (file names from a folder or a CSV) is made storable in Parquet: ids get
``\\xNN`` escapes, ``uri`` and ``path`` the reversible ``file:`` form of
:func:`imgsearch.paths.path_to_str` (open a ``path`` with :func:`imgsearch.paths.str_to_path`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy as sa

from imgsearch import schema as S
from imgsearch.errors import CatalogError, ConfigError, UnsafePathError
from imgsearch.paths import Resolver, is_within, path_to_str

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
_MAX_NAMED = 10  # how many offending names an error message lists


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

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"ingest.source must be one of {SOURCES}, not {self.source!r}")
        for name in ("item_columns", "image_columns", "filters"):
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


# --- entry point -------------------------------------------------------------------------------


def ingest(cfg: IngestConfig) -> IngestResult:
    """Read the catalog ``cfg`` describes. See the module docstring for the rules."""
    if cfg.source == "sql":
        if not cfg.url:
            raise ConfigError("ingest.url is required for source 'sql'")
        return ingest_sql(cfg.url, cfg)
    if not cfg.path:
        raise ConfigError(f"ingest.path is required for source {cfg.source!r}")
    if cfg.source == "table":
        return ingest_table(Path(cfg.path), cfg)
    return ingest_folder(Path(cfg.path), cfg)


# --- SQL ---------------------------------------------------------------------------------------


def _sqlite_file(url: sa.URL) -> Path | None:
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database)  # type: ignore[arg-type]  # not None here
    return None


def default_sql_data_root(url: str) -> Path | None:
    """The folder of a SQLite database file; ``None`` for other databases or in-memory SQLite."""
    db_file = _sqlite_file(sa.engine.make_url(url))
    return db_file.resolve().parent if db_file else None


def ingest_sql(url: str, cfg: IngestConfig | None = None) -> IngestResult:
    """Read ``images LEFT JOIN items`` from the database at ``url`` (a SQLAlchemy URL)."""
    cfg = replace(cfg or IngestConfig(), source="sql", url=url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"ingest.url is not a SQLAlchemy URL: {exc}") from None
    description = parsed.render_as_string(hide_password=True)
    db_file = _sqlite_file(parsed)
    if db_file is not None and not db_file.is_file():
        # SQLite would silently create an empty database
        raise CatalogError(f"SQLite catalog not found: {db_file}")
    root_text = cfg.data_root or default_sql_data_root(url)
    if root_text is None:
        raise ConfigError(f"ingest.data_root is required for {description}")
    data_root = _data_root(root_text)

    try:
        engine = sa.create_engine(parsed)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:  # e.g. the driver is not installed
        raise CatalogError(
            f"cannot open {description} (is its database driver installed?): {exc}"
        ) from exc
    try:
        frame, n_orphans = _query(engine, cfg)
    except sa.exc.SQLAlchemyError as exc:
        raise CatalogError(f"cannot read the catalog at {description}: {exc}") from exc
    finally:
        engine.dispose()
    result = _finish(frame, data_root, [])
    result.metrics["n_orphan_images"] = float(n_orphans)
    result.source = {
        "catalog_source": f"sql {description} items={cfg.items_table} images={cfg.images_table}",
        "catalog_data_root": str(data_root),
    }
    return result


def _query(engine: sa.Engine, cfg: IngestConfig) -> tuple[pd.DataFrame, int]:
    inspector = sa.inspect(engine)
    known = set(inspector.get_table_names(schema=cfg.db_schema)) | set(
        inspector.get_view_names(schema=cfg.db_schema)
    )
    for table_name in (cfg.items_table, cfg.images_table):
        if table_name not in known:
            raise CatalogError(f"table {table_name!r} not found; tables: {sorted(known)}")
    meta = sa.MetaData()
    items = sa.Table(cfg.items_table, meta, autoload_with=engine, schema=cfg.db_schema)
    images = sa.Table(cfg.images_table, meta, autoload_with=engine, schema=cfg.db_schema)

    image_plan = _plan_columns(
        list(images.columns.keys()),
        cfg.image_columns,
        canonical=IMAGE_CANONICAL,
        required=IMAGE_CANONICAL,
        strict=cfg.strict,
        where=f"images table {cfg.images_table!r}",
    )
    item_plan = _plan_columns(
        list(items.columns.keys()),
        cfg.item_columns,
        canonical=ITEM_CANONICAL,
        required=(S.ITEM_ID,),
        strict=cfg.strict,
        where=f"items table {cfg.items_table!r}",
    )
    clash = sorted((set(image_plan) & set(item_plan)) - {S.ITEM_ID})
    if clash:
        raise CatalogError(
            f"columns {clash} come from both the images and the items table; map one of them "
            "to another name (image_columns or item_columns)"
        )

    item_key = items.c[item_plan[S.ITEM_ID]]
    found = "__item_found"
    columns: list[sa.ColumnElement[Any]] = [
        images.c[src].label(out) for out, src in image_plan.items()
    ]
    columns += [items.c[src].label(out) for out, src in item_plan.items() if out != S.ITEM_ID]
    columns.append(item_key.label(found))
    stmt = sa.select(*columns).select_from(
        images.outerjoin(items, images.c[image_plan[S.ITEM_ID]] == item_key)
    )
    by_name = {out: images.c[src] for out, src in image_plan.items()}
    by_name.update({out: items.c[src] for out, src in item_plan.items() if out != S.ITEM_ID})
    for name, value in cfg.filters.items():
        if name not in by_name:
            raise ConfigError(
                f"ingest.filters: unknown column {name!r}; columns: {sorted(by_name)}"
            )
        stmt = stmt.where(_sql_condition(by_name[name], value))
    stmt = stmt.order_by(images.c[image_plan[S.IMAGE_ID]])

    with engine.connect() as conn:
        result = conn.execute(stmt)
        # object first: a nullable integer id would otherwise become a float ("7.0")
        frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
    others = [c for c in frame.columns if c not in S.REQUIRED_MANIFEST_COLUMNS]
    frame[others] = frame[others].infer_objects()
    n_orphans = int(frame[found].isna().sum())
    if n_orphans:
        log.warning(
            "%d images have no row in the items table: kept without item attributes", n_orphans
        )
    return frame.drop(columns=[found]), n_orphans


def _sql_condition(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    """``column = :value`` / ``column IN (:values...)`` / ``column IS NULL``: always bound parameters."""
    if isinstance(value, Mapping):
        raise ConfigError(f"ingest.filters: a value must be a scalar or a list, not {value!r}")
    if isinstance(value, list | tuple | set):
        values = list(value)
        condition = column.in_([v for v in values if v is not None])
        return sa.or_(condition, column.is_(None)) if None in values else condition
    return column.is_(None) if value is None else column == value


# --- CSV / Parquet -----------------------------------------------------------------------------


def ingest_table(path: Path, cfg: IngestConfig | None = None) -> IngestResult:
    """Read a CSV/TSV or Parquet manifest (one row per image)."""
    cfg = replace(cfg or IngestConfig(), source="table", path=str(path))
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    data_root = _data_root(cfg.data_root or path.resolve().parent)
    mapping = _merged_mapping(cfg)
    suffix = path.suffix.lower()
    text_columns = {mapping.get(name, name): str for name in S.REQUIRED_MANIFEST_COLUMNS}
    try:
        if suffix in CSV_SUFFIXES:
            sep = CSV_SUFFIXES[suffix]
            # the raw header: pandas would rename a duplicated column "a" to "a.1"
            header = pd.read_csv(
                path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False,
                encoding_errors="surrogateescape",
            )  # fmt: skip
            _refuse_duplicates(header.iloc[0].tolist() if len(header) else [], f"{path.name}")
            # ids and uris stay text ("007" is not 7); bytes that are not UTF-8 survive in uris
            frame = pd.read_csv(
                path, sep=sep, dtype=text_columns, encoding_errors="surrogateescape"
            )
            for name in frame.columns:  # other text must be valid UTF-8 for Parquet
                if frame[name].dtype == object and name not in text_columns:
                    frame[name] = frame[name].map(
                        lambda v: _clean_text(v) if isinstance(v, str) else v
                    )
        elif suffix in PARQUET_SUFFIXES:
            _refuse_duplicates(pq.read_schema(path).names, path.name)
            frame = pd.read_parquet(path)
        else:
            raise CatalogError(
                f"{path.name}: unknown table format {suffix!r}; use one of "
                f"{sorted((*CSV_SUFFIXES, *PARQUET_SUFFIXES))}"
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc

    plan = _plan_columns(
        [str(c) for c in frame.columns],
        mapping,
        canonical=ALL_CANONICAL,
        required=S.REQUIRED_MANIFEST_COLUMNS,
        strict=cfg.strict,
        where=path.name,
    )
    frame = pd.DataFrame({out: frame[src] for out, src in plan.items()})
    frame = _filter_frame(frame, cfg.filters)
    result = _finish(frame, data_root, [])
    result.source = {
        "catalog_source": f"table {path.resolve()}",
        "catalog_data_root": str(data_root),
    }
    return result


def _merged_mapping(cfg: IngestConfig) -> dict[str, str]:
    clash = {
        k
        for k in set(cfg.item_columns) & set(cfg.image_columns)
        if cfg.item_columns[k] != cfg.image_columns[k]
    }
    if clash:
        raise ConfigError(f"item_columns and image_columns map {sorted(clash)} differently")
    return {**cfg.item_columns, **cfg.image_columns}


# --- folder tree -------------------------------------------------------------------------------


def ingest_folder(path: Path, cfg: IngestConfig | None = None) -> IngestResult:
    """List a folder tree: ``<path>/<item_id>/**/<file>``; hidden files and folders are skipped."""
    cfg = replace(cfg or IngestConfig(), source="folder", path=str(path))
    folder = Path(path)
    if not folder.is_dir():
        raise CatalogError(f"catalog folder not found: {folder}")
    data_root = _data_root(cfg.data_root or folder)
    folder_real = os.fsencode(folder.resolve())
    root = os.fsencode(data_root)
    if folder_real != root and not is_within(folder_real, root):
        raise ConfigError(f"folder {folder} is not inside data_root {data_root}")
    prefix = os.path.relpath(folder_real, root) if folder_real != root else b""
    rows, rejected = _list_folder(folder_real, prefix, data_root)
    frame = pd.DataFrame(rows, columns=[S.IMAGE_ID, S.ITEM_ID, S.URI])
    frame = _filter_frame(frame, cfg.filters)
    result = _finish(frame, data_root, rejected)
    result.source = {
        "catalog_source": f"folder {folder.resolve()}",
        "catalog_data_root": str(data_root),
    }
    return result


def _list_folder(
    folder: bytes, prefix: bytes, data_root: Path
) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """Depth-first listing on bytes (``folder`` is resolved).

    A symlinked folder is followed only when it resolves inside the data root and outside
    ``folder`` and every folder followed before (else the same files would be listed twice, or
    forever in a loop); the others become rejected rows.
    """
    rows: list[dict[str, str]] = []
    rejected: list[dict[str, object]] = []
    resolver = Resolver(data_root)
    followed: list[bytes] = [folder]
    stack: list[bytes] = [b""]  # folders to list, relative to ``folder``
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir) if rel_dir else folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(b"."):
                continue
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            uri = path_to_str(os.path.join(prefix, rel) if prefix else rel)
            where = {
                S.IMAGE_ID: _clean_text(os.fsdecode(rel)),
                S.ITEM_ID: _clean_text(os.fsdecode(rel.split(b"/", 1)[0])),
                S.URI: uri,
            }
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif _is_folder_link(entry):
                try:
                    target = resolver.resolve_bytes(uri)
                except UnsafePathError as exc:
                    rejected.append(_reject(where, "unsafe_path", f"symlinked folder: {exc}"))
                    continue
                seen = [
                    f
                    for f in followed
                    if f == target or is_within(target, f) or is_within(f, target)
                ]
                if seen:
                    detail = f"symlink to a folder listed already: {os.fsdecode(target)!r}"
                    rejected.append(_reject(where, "duplicate_folder", detail))
                    continue
                followed.append(target)
                stack.append(rel)
            elif not _regular_or_link(entry):
                rejected.append(
                    _reject(where, "not_a_file", "not a regular file (FIFO, socket or device)")
                )
            elif rel_dir == b"":
                rejected.append(_reject(where, "no_item", "file outside any item folder"))
            else:
                rows.append(where)
    return rows, rejected


def _is_folder_link(entry: os.DirEntry[bytes]) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir(follow_symlinks=True)
    except OSError:  # a looping link: resolve_within refuses it as a file
        return False


def _regular_or_link(entry: os.DirEntry[bytes]) -> bool:
    """Regular files, and symlinks of any kind (resolve_within judges them, open reports dangling)."""
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:  # vanished while listing
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


# --- shared ------------------------------------------------------------------------------------


def _data_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise CatalogError(f"data root not found: {path}")
    return path


def _refuse_duplicates(names: Sequence[Any], where: str) -> None:
    dupes = sorted(str(n) for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise CatalogError(f"{where}: duplicated column names {dupes[:_MAX_NAMED]}")


def _plan_columns(
    available: Sequence[str],
    mapping: Mapping[str, str],
    *,
    canonical: Sequence[str],
    required: Sequence[str],
    strict: bool,
    where: str,
) -> dict[str, str]:
    """Manifest column -> catalog column, for one table. Raises CatalogError naming what is wrong."""
    _refuse_duplicates(available, where)
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
        raise CatalogError(f"{where}: unknown columns {extra[:_MAX_NAMED]} (strict mapping)")
    clash = [c for c in extra if c in plan or c in RESERVED]
    if clash:
        raise CatalogError(
            f"{where}: columns {clash} clash with manifest columns; map them to other names "
            "(for example {'source_width': 'width'}) or map the manifest column to them"
        )
    plan.update({c: c for c in extra})
    return plan


def _filter_frame(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """The pandas twin of :func:`_sql_condition` for table and folder sources."""
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


def _clean_text(text: str) -> str:
    """``text`` as valid UTF-8 (Parquet needs it): undecodable bytes become ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _as_text(value: Any) -> str | None:
    """A catalog id/uri as text; ``None`` when empty."""
    if value is None or (not isinstance(value, str | bytes) and pd.isna(value)):
        return None
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer id that went through a float column (NaN elsewhere)
    text = str(value)
    return text if text.strip() else None


def _reject(where: Mapping[str, Any], reason: str, detail: str) -> dict[str, object]:
    return {
        S.IMAGE_ID: where.get(S.IMAGE_ID),
        S.ITEM_ID: where.get(S.ITEM_ID),
        S.URI: where.get(S.URI),
        S.STAGE: STAGE,
        S.REASON: reason,
        S.DETAIL: detail,
    }


def _finish(
    frame: pd.DataFrame, data_root: Path, rejected: list[dict[str, object]]
) -> IngestResult:
    """Normalise ids and uris, refuse duplicates, resolve paths, add absent attributes as NA."""
    frame = frame.reset_index(drop=True)
    ids = frame[S.IMAGE_ID].map(_as_text)
    items = frame[S.ITEM_ID].map(_as_text)
    uris = frame[S.URI].map(_as_text)  # raw: bytes that are not UTF-8 still name their file
    rejected = list(rejected)

    dupes = ids[ids.notna() & ids.duplicated(keep=False)].unique().tolist()
    if dupes:
        raise CatalogError(f"duplicate image ids ({len(dupes)}): {sorted(dupes)[:_MAX_NAMED]}")
    clean = pd.DataFrame(
        {
            S.IMAGE_ID: ids.map(_clean_text, na_action="ignore"),
            S.ITEM_ID: items.map(_clean_text, na_action="ignore"),
            S.URI: uris.map(path_to_str, na_action="ignore"),
        }
    )

    resolver = Resolver(data_root)
    keep: list[int] = []
    paths: list[str] = []
    for pos, (image_id, item_id, uri) in enumerate(zip(ids, items, uris, strict=True)):
        if image_id is None or item_id is None or uri is None:
            empty = [
                c for c, v in zip(clean.columns, (image_id, item_id, uri), strict=True) if v is None
            ]
            detail = f"empty {', '.join(empty)}"
            rejected.append(_reject(clean.iloc[pos].to_dict(), "missing_value", detail))
            continue
        try:
            paths.append(path_to_str(resolver.resolve_bytes(uri)))
        except UnsafePathError as exc:
            rejected.append(_reject(clean.iloc[pos].to_dict(), "unsafe_path", str(exc)))
            continue
        keep.append(pos)

    manifest = frame.iloc[keep].reset_index(drop=True)
    for name in clean.columns:
        manifest[name] = clean[name].iloc[keep].to_numpy()
    manifest[S.PATH] = paths
    for name in S.ITEM_ATTRIBUTES:
        if name not in manifest.columns:
            manifest[name] = pd.Series(pd.NA, index=manifest.index, dtype="object")
    first = [*S.REQUIRED_MANIFEST_COLUMNS, S.PATH, *S.ITEM_ATTRIBUTES]
    manifest = manifest[first + [c for c in manifest.columns if c not in first]]
    manifest = manifest.sort_values(S.IMAGE_ID, kind="stable").reset_index(drop=True)

    rejected_df = S.quarantine_rows(rejected)
    metrics = {
        "n_items": float(manifest[S.ITEM_ID].nunique()),
        "n_images": float(len(manifest)),
        "n_rejected": float(len(rejected_df)),
    }
    for reason, count in Counter(r[S.REASON] for r in rejected).items():
        metrics[f"n_rejected_{reason}"] = float(count)
    log.info(
        "ingest: %d images of %d items, %d rejected",
        len(manifest),
        manifest[S.ITEM_ID].nunique(),
        len(rejected_df),
    )
    return IngestResult(manifest=manifest, rejected=rejected_df, metrics=metrics)
