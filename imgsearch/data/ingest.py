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
  what is an image); see :mod:`imgsearch.data.ingest_folder`.

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
- ``duplicate_folder``: (folder) a symlinked folder whose target was already listed;
- ``hidden``: (folder) a name starting with ``.`` (a hidden folder is one row, not walked);
- ``ambiguous_id``: a name that is not UTF-8 whose ``\\xNN`` escape (below) is also another
  image's or item's real name: the escaped one is rejected, the real name is kept.

Rows left out by ``filters`` are a choice, not a rejection. Malformed catalogs raise
:class:`CatalogError`: missing required columns, duplicated column names, duplicate image ids,
unknown columns when strict, catalog columns that clash with manifest columns, a CSV row with
more fields than the header (named by line number), and a catalog with no usable image at all
(unless filters left the rows out): the first stage that can tell stops the pipeline.

Ids become text (``101``, ``"007"`` stay as written). The manifest is sorted by ``image_id``.
Text that is not UTF-8 (file names from a folder or a CSV) is made storable in Parquet: ids get
``\\xNN`` escapes, ``uri`` and ``path`` the reversible ``file:`` form of
:func:`imgsearch.paths.path_to_str` (open a ``path`` with :func:`imgsearch.paths.str_to_path`).
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy as sa

from imgsearch import schema as S
from imgsearch.data import texts as T
from imgsearch.data.catalog import (
    ALL_CANONICAL,
    CSV_SUFFIXES,
    IMAGE_CANONICAL,
    ITEM_CANONICAL,
    MAX_NAMED,
    PARQUET_SUFFIXES,
    IngestConfig,
    IngestResult,
    clean_text,
    filter_frame,
    finish,
    plan_columns,
    refuse_duplicates,
)
from imgsearch.data.catalog import data_root as resolve_data_root
from imgsearch.data.ingest_folder import ingest_folder
from imgsearch.errors import CatalogError, ConfigError

__all__ = [
    "IngestConfig",
    "IngestResult",
    "default_sql_data_root",
    "ingest",
    "ingest_folder",
    "ingest_sql",
    "ingest_table",
]

log = logging.getLogger(__name__)


# --- entry point -------------------------------------------------------------------------------


def ingest(cfg: IngestConfig) -> IngestResult:
    """Read the catalog ``cfg`` describes, with its item texts. See the module docstring for the rules."""
    if cfg.source == "sql":
        if not cfg.url:
            raise ConfigError("ingest.url is required for source 'sql'")
        result = ingest_sql(cfg.url, cfg)
    elif not cfg.path:
        raise ConfigError(f"ingest.path is required for source {cfg.source!r}")
    elif cfg.source == "table":
        result = ingest_table(Path(cfg.path), cfg)
    else:
        result = ingest_folder(Path(cfg.path), cfg)
    return with_texts(result, cfg)


def with_texts(result: IngestResult, cfg: IngestConfig) -> IngestResult:
    """Attach the catalog's item texts (:mod:`imgsearch.data.texts`); bad rows join the rejected."""
    manifest = result.manifest
    parts = [T.from_columns(manifest, cfg.text_columns, cfg.text_lang, cfg.tag_separator)]
    rejected = [result.rejected]
    items = set(manifest[S.ITEM_ID].astype(str))
    table: pd.DataFrame | None = None
    if cfg.texts_table:
        if cfg.source != "sql" or not cfg.url:
            raise ConfigError("ingest.texts_table is for sql catalogs; use ingest.texts_path")
        table, where = T.read_sql_table(cfg.url, cfg.texts_table, cfg.db_schema), cfg.texts_table
    elif cfg.texts_path:
        root = Path(result.source.get("catalog_data_root") or ".")
        path = Path(cfg.texts_path)
        path = path if path.is_absolute() else root / path
        table, where = T.read_file(path), path.name
    if table is not None:
        texts, bad = T.check_table(table, items, where)
        parts.append(texts)
        rejected.append(bad)
    result.texts = T.combine(parts)
    bad_rows = [r for r in rejected[1:] if len(r)]
    if bad_rows:
        result.rejected = pd.concat([result.rejected, *bad_rows], ignore_index=True)
    if cfg.text_columns or table is not None:
        result.metrics.update(
            T.text_metrics(result.texts, pd.concat(rejected[1:] or [S.empty_quarantine()]))
        )
    return result


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
    data_root = resolve_data_root(root_text)

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
    result = finish(frame, data_root, [], filtered=bool(cfg.filters))
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

    image_plan = plan_columns(
        list(images.columns.keys()),
        cfg.image_columns,
        canonical=IMAGE_CANONICAL,
        required=IMAGE_CANONICAL,
        strict=cfg.strict,
        where=f"images table {cfg.images_table!r}",
    )
    item_plan = plan_columns(
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
    data_root = resolve_data_root(cfg.data_root or path.resolve().parent)
    mapping = _merged_mapping(cfg)
    frame = _read_table(path, mapping)
    plan = plan_columns(
        [str(c) for c in frame.columns],
        mapping,
        canonical=ALL_CANONICAL,
        required=S.REQUIRED_MANIFEST_COLUMNS,
        strict=cfg.strict,
        where=path.name,
    )
    frame = pd.DataFrame({out: frame[src] for out, src in plan.items()})
    frame = filter_frame(frame, cfg.filters)
    result = finish(frame, data_root, [], filtered=bool(cfg.filters))
    result.source = {
        "catalog_source": f"table {path.resolve()}",
        "catalog_data_root": str(data_root),
    }
    return result


def _read_table(path: Path, mapping: dict[str, str]) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in CSV_SUFFIXES:
            return _read_csv(path, CSV_SUFFIXES[suffix], mapping)
        if suffix in PARQUET_SUFFIXES:
            refuse_duplicates(pq.read_schema(path).names, path.name)
            return pd.read_parquet(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc
    raise CatalogError(
        f"{path.name}: unknown table format {suffix!r}; use one of "
        f"{sorted((*CSV_SUFFIXES, *PARQUET_SUFFIXES))}"
    )


def _read_csv(path: Path, sep: str, mapping: dict[str, str]) -> pd.DataFrame:
    # the raw header: pandas would rename a duplicated column "a" to "a.1"
    header = pd.read_csv(
        path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False,
        encoding_errors="surrogateescape",
    )  # fmt: skip
    names = header.iloc[0].tolist() if len(header) else []
    refuse_duplicates(names, path.name)
    # ids and uris stay text ("007" is not 7); bytes that are not UTF-8 survive in uris
    text_columns = {mapping.get(name, name): str for name in S.REQUIRED_MANIFEST_COLUMNS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        # index_col=False: with more fields than header names in the first row, pandas would
        # otherwise take the first column(s) as the index and shift every column to the left
        frame = pd.read_csv(
            path, sep=sep, dtype=text_columns, encoding_errors="surrogateescape", index_col=False
        )
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        _refuse_ragged(path, sep, len(names))
    for name in frame.columns:  # other text must be valid UTF-8 for Parquet
        if frame[name].dtype == object and name not in text_columns:
            frame[name] = frame[name].map(lambda v: clean_text(v) if isinstance(v, str) else v)
    return frame


def _refuse_ragged(path: Path, sep: str, n_fields: int) -> None:
    """Raise naming the lines with more (non-empty) fields than the header.

    pandas warns and drops the extra fields (``index_col=False``) without saying where; the
    csv module says which line. Extra fields that are all empty (a trailing separator) are data
    lost by nobody, so they pass.
    """
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh, delimiter=sep)
        for record in reader:
            if len(record) > n_fields and any(f.strip() for f in record[n_fields:]):
                lines.append(reader.line_num)
    if lines:
        raise CatalogError(
            f"{path.name}: {len(lines)} rows have more fields than the header's {n_fields} "
            f"(lines {lines[:MAX_NAMED]}); quote the fields or fix the rows"
        )


def _merged_mapping(cfg: IngestConfig) -> dict[str, str]:
    clash = {
        k
        for k in set(cfg.item_columns) & set(cfg.image_columns)
        if cfg.item_columns[k] != cfg.image_columns[k]
    }
    if clash:
        raise ConfigError(f"item_columns and image_columns map {sorted(clash)} differently")
    return {**cfg.item_columns, **cfg.image_columns}
