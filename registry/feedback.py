"""Thumbs up / down on search results, kept in a SQL table (SQLAlchemy) that survives restarts.

One row per vote::

    feedback(id, created_at, query_sha256, query_image_id, result_image_id, result_item_id,
             rank, score, vote, index_version, extractor_version, session, query_text,
             query_lang, query_id)

``vote`` is ``+1`` or ``-1``; ``query_image_id`` is set when the query was a catalog image (it is
``NULL`` for an upload, which is identified by the sha256 of its bytes only: uploads are never
stored). ``index_version`` / ``extractor_version`` are the registry versions that answered, so
votes can be joined with the model that earned them; ``query_id`` joins a vote to the
impression (the result list shown) it was cast on (:mod:`registry.impressions`).

Where the table lives: the ``IMGSEARCH_FEEDBACK_URL`` environment variable, else the configured
URL (``configs/search.yaml`` ``feedback_url``), else SQLite at
``imgsearch.config.home_dir()/feedback.db``. Any SQLAlchemy URL works (PostgreSQL in production).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from imgsearch.config import home_dir
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

FEEDBACK_URL_ENV = "IMGSEARCH_FEEDBACK_URL"
DB_FILE = "feedback.db"
UP, DOWN = 1, -1

metadata = sa.MetaData()
feedback_table = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("query_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("query_image_id", sa.String(512), nullable=True),
    sa.Column("result_image_id", sa.String(512), nullable=False, index=True),
    sa.Column("result_item_id", sa.String(512), nullable=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("vote", sa.SmallInteger, nullable=False),
    sa.Column("index_version", sa.String(64), nullable=True),
    sa.Column("extractor_version", sa.String(64), nullable=True),
    sa.Column("session", sa.String(128), nullable=True),
    sa.Column("query_text", sa.Text, nullable=True),  # a text query (None for an image)
    sa.Column("query_lang", sa.String(16), nullable=True),
    # the impression the vote was cast on (registry.impressions); NULL for older votes
    sa.Column("query_id", sa.String(64), nullable=True),
    sa.CheckConstraint("vote IN (-1, 1)", name="vote_is_up_or_down"),
)
COLUMNS = tuple(c.name for c in feedback_table.columns)


def feedback_url(configured: str | None = None) -> str:
    """The store's URL: ``$IMGSEARCH_FEEDBACK_URL``, else ``configured``, else SQLite in home."""
    url = os.environ.get(FEEDBACK_URL_ENV) or configured
    if url:
        return url
    return f"sqlite:///{home_dir() / DB_FILE}"


def query_sha256(data: bytes) -> str:
    """How a query is identified in the table: the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def text_query_sha256(text: str, lang: str | None = None) -> str:
    """A text query's id: the sha256 of ``text:<lang>:<text>`` (never equal to an image's)."""
    return query_sha256(f"text:{lang or ''}:{text}".encode())


#: columns added after the first release: added to an existing table when missing
_ADDED_COLUMNS = ("query_text", "query_lang", "query_id")


@dataclass(frozen=True)
class Vote:
    """One vote on one result row of one query."""

    query_sha256: str
    result_image_id: str
    rank: int
    vote: int
    result_item_id: str | None = None
    score: float | None = None
    query_image_id: str | None = None
    index_version: str | None = None
    extractor_version: str | None = None
    session: str | None = None
    query_text: str | None = None
    query_lang: str | None = None
    query_id: str | None = None

    def __post_init__(self) -> None:
        if self.vote not in (UP, DOWN):
            raise ValueError(f"vote must be +1 or -1, got {self.vote!r}")
        if len(self.query_sha256) != 64:
            raise ValueError("query_sha256 must be a 64-character sha256 hex digest")
        if not self.result_image_id:
            raise ValueError("result_image_id is required")
        if int(self.rank) < 1:
            raise ValueError(f"rank is 1-based, got {self.rank!r}")


def add_missing_columns(engine: Engine, table: sa.Table, names: Sequence[str]) -> None:
    """A table made by an older release gains the new nullable columns ``names`` (old rows:
    NULL), so an existing SQLite or PostgreSQL store keeps working after an upgrade."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
    for name in names:
        if name not in have:
            column = table.c[name]
            ddl = sa.schema.DDL(
                f"ALTER TABLE {table.name} ADD COLUMN {name} "
                f"{column.type.compile(dialect=engine.dialect)}"
            )  # constant names from the table definitions, never user input
            with engine.begin() as conn:
                conn.execute(ddl)


class FeedbackStore:
    """The feedback table behind one SQLAlchemy URL; the table is created when missing."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None) -> None:
        self.url = url or feedback_url()
        if engine is None:
            try:
                parsed = make_url(self.url)
            except sa.exc.ArgumentError as exc:
                raise ConfigError(f"bad feedback store URL {self.url!r}: {exc}") from exc
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (
                None,
                "",
                ":memory:",
            ):
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(parsed)
        self.engine = engine
        metadata.create_all(self.engine, checkfirst=True)
        add_missing_columns(self.engine, feedback_table, _ADDED_COLUMNS)

    def record(self, vote: Vote, *, now: datetime | None = None) -> int:
        """Store one vote; returns its row id. Bound parameters only (never formatted SQL)."""
        row: dict[str, Any] = {
            "created_at": now or datetime.now(timezone.utc),
            "query_sha256": vote.query_sha256,
            "query_image_id": vote.query_image_id,
            "result_image_id": str(vote.result_image_id),
            "result_item_id": None if vote.result_item_id is None else str(vote.result_item_id),
            "rank": int(vote.rank),
            "score": None if vote.score is None else float(vote.score),
            "vote": int(vote.vote),
            "index_version": vote.index_version,
            "extractor_version": vote.extractor_version,
            "session": vote.session,
            "query_text": vote.query_text,
            "query_lang": vote.query_lang,
            "query_id": vote.query_id,
        }
        with self.engine.begin() as conn:
            result = conn.execute(feedback_table.insert().values(**row))
            key = result.inserted_primary_key
        assert key is not None
        log.info("feedback %+d on %s (rank %d)", vote.vote, vote.result_image_id, vote.rank)
        return int(key[0])

    def votes(
        self, *, query_sha256: str | None = None, index_version: str | None = None
    ) -> pd.DataFrame:
        """Every vote (optionally of one query / one index version), oldest first."""
        stmt = sa.select(feedback_table).order_by(feedback_table.c.id)
        if query_sha256 is not None:
            stmt = stmt.where(feedback_table.c.query_sha256 == query_sha256)
        if index_version is not None:
            stmt = stmt.where(feedback_table.c.index_version == str(index_version))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return pd.DataFrame([dict(r) for r in rows], columns=list(COLUMNS))

    def summary(self) -> pd.DataFrame:
        """Per index version: number of votes, ups, downs and the share of ups."""
        c = feedback_table.c
        stmt = (
            sa.select(
                c.index_version,
                sa.func.count().label("votes"),
                sa.func.sum(sa.case((c.vote == UP, 1), else_=0)).label("up"),
                sa.func.sum(sa.case((c.vote == DOWN, 1), else_=0)).label("down"),
            )
            .group_by(c.index_version)
            .order_by(c.index_version)
        )
        with self.engine.connect() as conn:
            df = pd.DataFrame(conn.execute(stmt).mappings().all())
        if df.empty:
            return pd.DataFrame(columns=["index_version", "votes", "up", "down", "up_share"])
        df["up_share"] = df["up"] / df["votes"]
        return df

    def dispose(self) -> None:
        self.engine.dispose()
