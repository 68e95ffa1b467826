"""Item texts: the words a catalog has for its items, one row per text, in any language.

Two sources, combined:

- columns of the catalog (``ingest.text_columns``: manifest column -> kind, e.g.
  ``{item_name: name, tags: tag}``), in the language ``ingest.text_lang``; a ``tag`` column is
  split on ``ingest.tag_separator`` into one row per tag;
- a texts table (``ingest.texts_table`` in a SQL catalog, or ``ingest.texts_path``, a CSV/Parquet
  file, for table and folder catalogs) with columns ``item_id, lang, kind, text``, for
  multilingual catalogs.

Output columns: ``item_id, lang, kind, text`` (all str), duplicates removed, sorted. Rows that
cannot be used are rejected with a reason (quarantine schema, ``stage="ingest_texts"``), never
dropped silently: ``unknown_item`` (no such item among the ingested images), ``empty_text``,
``not_text`` (a number or another non-string value in the text column), ``missing_value``
(no item id, lang or kind).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from imgsearch import schema as S
from imgsearch.errors import CatalogError

LANG, KIND, TEXT = "lang", "kind", "text"
TEXT_COLUMNS = (S.ITEM_ID, LANG, KIND, TEXT)
TAG_KIND = "tag"
STAGE = "ingest_texts"


def empty_texts() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in TEXT_COLUMNS})


def from_columns(
    manifest: pd.DataFrame, text_columns: Mapping[str, str], lang: str, tag_separator: str
) -> pd.DataFrame:
    """Texts from item columns of the manifest (one value per item; tags split)."""
    parts = []
    for column, kind in text_columns.items():
        if column not in manifest.columns:
            raise CatalogError(
                f"ingest.text_columns names {column!r}, which the manifest lacks; "
                f"columns: {sorted(manifest.columns)}"
            )
        values = manifest[[S.ITEM_ID, column]].drop_duplicates(S.ITEM_ID).dropna()
        values = values[values[column].map(lambda v: isinstance(v, str))]
        if kind == TAG_KIND:
            values = values.assign(**{column: values[column].str.split(tag_separator)})
            values = values.explode(column)
        texts = values[column].astype(str).str.strip()
        parts.append(
            pd.DataFrame(
                {S.ITEM_ID: values[S.ITEM_ID].astype(str), LANG: lang, KIND: kind, TEXT: texts}
            )
        )
    out = pd.concat(parts, ignore_index=True) if parts else empty_texts()
    return out[out[TEXT] != ""]


def _reject(row: Mapping[str, Any], reason: str, detail: str) -> dict[str, object]:
    return {S.ITEM_ID: row.get(S.ITEM_ID), S.STAGE: STAGE, S.REASON: reason, S.DETAIL: detail}


def check_table(
    frame: pd.DataFrame, items: set[str], where: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(texts, rejected)`` from a texts table; see the module doc for the reasons."""
    missing = [c for c in TEXT_COLUMNS if c not in frame.columns]
    if missing:
        raise CatalogError(
            f"{where}: the texts table lacks columns {missing} (needs {list(TEXT_COLUMNS)})"
        )
    good, bad = [], []
    for row in frame[list(TEXT_COLUMNS)].to_dict("records"):
        item, text = row[S.ITEM_ID], row[TEXT]
        if any(pd.isna(row[c]) or str(row[c]).strip() == "" for c in (S.ITEM_ID, LANG, KIND)):
            bad.append(_reject(row, "missing_value", f"{where}: {row}"))
        elif not isinstance(text, str):
            bad.append(_reject(row, "not_text", f"{where}: {type(text).__name__} {text!r}"))
        elif not text.strip():
            bad.append(_reject(row, "empty_text", f"{where}: lang={row[LANG]} kind={row[KIND]}"))
        elif str(item) not in items:
            bad.append(_reject(row, "unknown_item", f"{where}: {text[:80]!r}"))
        else:
            good.append(
                {
                    S.ITEM_ID: str(item),
                    LANG: str(row[LANG]).strip(),
                    KIND: str(row[KIND]).strip(),
                    TEXT: text.strip(),
                }
            )
    texts = pd.DataFrame(good, columns=list(TEXT_COLUMNS)) if good else empty_texts()
    return texts, S.quarantine_rows(bad)


def read_sql_table(url: str, table: str, db_schema: str | None = None) -> pd.DataFrame:
    """The texts table of a SQL catalog (reflected; its name checked, nothing formatted into SQL)."""
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        if table not in set(inspector.get_table_names(schema=db_schema)):
            raise CatalogError(f"texts table {table!r} not found in the catalog database")
        reflected = sa.Table(table, sa.MetaData(), autoload_with=engine, schema=db_schema)
        with engine.connect() as conn:
            result = conn.execute(sa.select(reflected))
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
    except sa.exc.SQLAlchemyError as exc:
        raise CatalogError(f"cannot read the texts table {table!r}: {exc}") from exc
    finally:
        engine.dispose()


def read_file(path: Path) -> pd.DataFrame:
    """A CSV/TSV or Parquet texts file (all values read as written: no type guessing)."""
    if not path.is_file():
        raise CatalogError(f"texts file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CatalogError(f"cannot read texts file {path}: {exc}") from exc


def combine(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """One table: duplicates removed, sorted by item, lang, kind, text."""
    frames = [p for p in parts if len(p)]
    if not frames:
        return empty_texts()
    out = pd.concat(frames, ignore_index=True).astype(str).drop_duplicates()
    return out.sort_values(list(TEXT_COLUMNS), kind="stable").reset_index(drop=True)


def text_metrics(texts: pd.DataFrame, rejected: pd.DataFrame) -> dict[str, float]:
    out = {
        "n_texts": float(len(texts)),
        "n_text_items": float(texts[S.ITEM_ID].nunique()) if len(texts) else 0.0,
        "n_rejected_texts": float(len(rejected)),
    }
    for (lang, kind), n in texts.groupby([LANG, KIND]).size().items():
        out[f"n_texts_{lang}_{kind}"] = float(n)
    return out
