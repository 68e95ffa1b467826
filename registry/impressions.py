"""What was shown, not only what was voted on: an ``impressions`` table beside ``feedback``.

One row per result shown::

    impressions(id, created_at, query_id, session, source, query_sha256, query_image_id,
                query_text, query_lang, rank, result_image_id, result_item_id, score,
                similarity, index_version, extractor_version, text_version, reranker_version,
                ab_team, ab_arm_a, ab_arm_b)

``query_id`` (a random hex id) groups the rows of one answered query; a vote carries the same
``query_id`` (:mod:`registry.feedback`), so votes join the list they were cast on, and the rows
nobody voted on are the negatives (with their rank: the position propensities).

Privacy: a query image is kept as the sha256 of its bytes (never the bytes); a text query as
typed (refused texts never reach the table: the model refuses them before it answers).

Same store as the votes: :func:`registry.feedback.feedback_url` (``IMGSEARCH_FEEDBACK_URL``, any
SQLAlchemy URL). The served model writes impressions only when its logging hook is configured
(:func:`hook_url`): the load-time ``model_config`` key ``impressions_url`` or the environment
variable ``IMGSEARCH_IMPRESSIONS_URL``; without either, a plain ``mlflow models serve`` writes
nothing, and a store that fails never fails a request (a warning is logged).

Online A/B (:mod:`imgsearch.search.interleave`): a team-draft interleaved list stores each shown
result's team (``ab_team``: ``A`` / ``B``) and which ranking each arm was (``ab_arm_a`` /
``ab_arm_b``, e.g. ``imgsearch-reranker v3`` / ``first_stage``); the three are NULL for a list
shown without an A/B. A table made by an older release gains them when the store is opened
(:func:`registry.feedback.add_missing_columns`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from imgsearch.search.interleave import ARM_A, ARM_B, TEAM
from registry.feedback import FeedbackStore, add_missing_columns

log = logging.getLogger(__name__)

IMPRESSIONS_URL_ENV = "IMGSEARCH_IMPRESSIONS_URL"
CONFIG_KEY = "impressions_url"
SOURCE_PAGE, SOURCE_MODEL = "page", "model"

metadata = sa.MetaData()
impressions_table = sa.Table(
    "impressions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("query_id", sa.String(64), nullable=False, index=True),
    sa.Column("session", sa.String(128), nullable=True, index=True),
    sa.Column("source", sa.String(16), nullable=True),
    sa.Column("query_sha256", sa.String(64), nullable=False),
    sa.Column("query_image_id", sa.String(512), nullable=True),
    sa.Column("query_text", sa.Text, nullable=True),
    sa.Column("query_lang", sa.String(16), nullable=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("result_image_id", sa.String(512), nullable=False),
    sa.Column("result_item_id", sa.String(512), nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("similarity", sa.Float, nullable=True),
    sa.Column("index_version", sa.String(64), nullable=True),
    sa.Column("extractor_version", sa.String(64), nullable=True),
    sa.Column("text_version", sa.String(64), nullable=True),
    sa.Column("reranker_version", sa.String(64), nullable=True),
    # the online A/B (imgsearch.search.interleave); NULL when the list was not interleaved
    sa.Column(TEAM, sa.String(1), nullable=True),
    sa.Column(ARM_A, sa.String(128), nullable=True),
    sa.Column(ARM_B, sa.String(128), nullable=True),
)
#: columns added after the first release: added to an existing table when missing
_ADDED_COLUMNS = (TEAM, ARM_A, ARM_B)
COLUMNS = tuple(c.name for c in impressions_table.columns)


def new_query_id() -> str:
    return uuid.uuid4().hex


def hook_url(model_config: Mapping[str, Any] | None = None) -> str | None:
    """The served model's impressions store, or None (no logging): ``$IMGSEARCH_IMPRESSIONS_URL``
    wins over the model config's ``impressions_url``."""
    url = os.environ.get(IMPRESSIONS_URL_ENV) or (model_config or {}).get(CONFIG_KEY)
    return str(url) if url else None


@dataclass(frozen=True)
class Versions:
    """The registry versions that produced a result list (``None`` when unknown)."""

    index: str | None = None
    extractor: str | None = None
    text: str | None = None
    reranker: str | None = None


@dataclass(frozen=True)
class Impression:
    """One answered query: who asked what, and the result list shown (best first)."""

    query_sha256: str
    results: pd.DataFrame  # rank, image_id, item_id, score, similarity
    versions: Versions = field(default_factory=Versions)
    query_id: str = field(default_factory=new_query_id)
    session: str | None = None
    source: str = SOURCE_PAGE
    query_image_id: str | None = None
    query_text: str | None = None
    query_lang: str | None = None
    ab_arms: tuple[str, str] | None = None  # (arm A, arm B) of an interleaved list

    def __post_init__(self) -> None:
        if len(self.query_sha256) != 64:
            raise ValueError("query_sha256 must be a 64-character sha256 hex digest")
        missing = {"rank", "image_id"} - set(self.results.columns)
        if missing:
            raise ValueError(f"results need columns {sorted(missing)}")
        if self.ab_arms is not None and TEAM not in self.results.columns:
            raise ValueError(f"an A/B impression needs the team of each result ({TEAM!r})")


def _value(row: Mapping[str, Any], name: str, kind: type) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, float) and value != value):
        return None
    return kind(value)


class ImpressionStore:
    """The impressions table behind one SQLAlchemy URL (the feedback store's by default)."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None) -> None:
        feedback = FeedbackStore(url, engine=engine)  # same URL rules; the votes table too
        self.url, self.engine = feedback.url, feedback.engine
        metadata.create_all(self.engine, checkfirst=True)
        add_missing_columns(self.engine, impressions_table, _ADDED_COLUMNS)

    def record(self, impression: Impression, *, now: datetime | None = None) -> str:
        """Store every shown result of ``impression`` in one transaction; returns its query id."""
        when = now or datetime.now(timezone.utc)
        v = impression.versions
        arm_a, arm_b = impression.ab_arms or (None, None)
        rows = []
        for r in impression.results.to_dict("records"):
            rows.append(
                {
                    "created_at": when,
                    "query_id": impression.query_id,
                    "session": impression.session,
                    "source": impression.source,
                    "query_sha256": impression.query_sha256,
                    "query_image_id": impression.query_image_id,
                    "query_text": impression.query_text,
                    "query_lang": impression.query_lang,
                    "rank": int(r["rank"]),
                    "result_image_id": str(r["image_id"]),
                    "result_item_id": _value(r, "item_id", str),
                    "score": _value(r, "score", float),
                    "similarity": _value(r, "similarity", float),
                    "index_version": v.index,
                    "extractor_version": v.extractor,
                    "text_version": v.text,
                    "reranker_version": v.reranker,
                    TEAM: _value(r, TEAM, str) if impression.ab_arms else None,
                    ARM_A: arm_a,
                    ARM_B: arm_b,
                }
            )
        if rows:
            with self.engine.begin() as conn:
                conn.execute(impressions_table.insert(), rows)  # bound parameters only
        return impression.query_id

    def impressions(
        self, *, query_id: str | None = None, session: str | None = None, ab_only: bool = False
    ) -> pd.DataFrame:
        """Shown results (optionally of one query or one session, or only those of A/B lists),
        in insertion order."""
        stmt = sa.select(impressions_table).order_by(impressions_table.c.id)
        if ab_only:
            stmt = stmt.where(impressions_table.c[TEAM].is_not(None))
        if query_id is not None:
            stmt = stmt.where(impressions_table.c.query_id == query_id)
        if session is not None:
            stmt = stmt.where(impressions_table.c.session == session)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return pd.DataFrame([dict(r) for r in rows], columns=list(COLUMNS))

    def dispose(self) -> None:
        self.engine.dispose()


def record_quietly(store: ImpressionStore | None, impressions: Sequence[Impression]) -> None:
    """The serving hook: write, and on any store failure log a warning instead of failing the
    request (a search must not depend on the analytics store being up)."""
    if store is None:
        return
    for impression in impressions:
        try:
            store.record(impression)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("impression of query %s not stored: %s", impression.query_id, exc)


def labelled(impressions: pd.DataFrame, votes: pd.DataFrame) -> pd.DataFrame:
    """Impressions joined with the votes cast on them (by ``query_id`` and result image):
    column ``vote`` is +1, -1 or 0 (shown, not voted on); the last vote on a result counts."""
    out = impressions.copy()
    if votes.empty or "query_id" not in votes.columns:
        out["vote"] = 0
        return out
    last = (
        votes.dropna(subset=["query_id"])
        .sort_values("id")
        .drop_duplicates(["query_id", "result_image_id"], keep="last")[
            ["query_id", "result_image_id", "vote"]
        ]
    )
    out = out.merge(last, on=["query_id", "result_image_id"], how="left")
    out["vote"] = out["vote"].fillna(0).astype(int)
    return out
