"""Train rerankers from logged sessions and compare them with the first stage on held-out ones.

Sessions are rows of shown results (:func:`imgsearch.search.click_sim.simulate`, or impressions
joined with votes by :func:`registry.impressions.labelled` plus index metadata): ``query_id``,
``rank``, ``result_image_id`` (as ``image_id`` for the features), ``similarity``,
``popularity``, ``category``, optionally ``query_category``, ``vote``, and ``grade`` (the true
relevance, known only in simulation; otherwise the up votes are the relevance). With an
``attribute_agreement`` column (:func:`imgsearch.search.reranker.attribute_agreement` of each
query's predicted attributes) a candidate configured with ``attributes=True`` uses it too; one
asking for it without the column is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.search.relevance_feedback import rocchio
from imgsearch.search.reranker import (
    ATTRIBUTE_AGREEMENT,
    FEATURES,
    LearnedReranker,
    RerankerConfig,
    features,
    ranking_metrics,
    rates_without,
    vote_counts,
    vote_rates,
)

log = logging.getLogger(__name__)

#: the comparison of the issue: name -> config (None = the first-stage order)
DEFAULT_CANDIDATES: dict[str, RerankerConfig | None] = {
    "first_stage": None,
    "logistic": RerankerConfig(kind="logistic"),
    "lambdarank": RerankerConfig(kind="lambdarank", debias=False),
    "lambdarank_debiased": RerankerConfig(kind="lambdarank", debias=True),
}


@dataclass
class Arrays:
    """Features, labels, query ids, shown positions and true relevance, rows grouped by query."""

    x: np.ndarray
    labels: np.ndarray
    query_ids: np.ndarray
    positions: np.ndarray
    relevance: list[np.ndarray]


def arrays(
    sessions: pd.DataFrame, rates: pd.DataFrame | None, counts: pd.DataFrame | None = None
) -> Arrays:
    """Per query (in first-stage order) the features of its shown results (with
    ``attribute_agreement`` last when the sessions have that column). With ``counts`` (the
    :func:`vote_counts` of these same sessions: training data) each query's vote rates leave
    its own rows out, so a row's ``up_rate`` never contains the vote it is trained to predict."""
    with_attributes = ATTRIBUTE_AGREEMENT in sessions.columns
    xs, ys, qs, ps, rel = [], [], [], [], []
    for qid, rows in sessions.groupby("query_id", sort=False):
        rows = rows.sort_values("rank", kind="stable")
        cands = rows.rename(columns={"result_image_id": schema.IMAGE_ID})
        qcat = rows["query_category"].iloc[0] if "query_category" in rows.columns else None
        qcat = None if qcat is None or pd.isna(qcat) else qcat
        own_rates = rates if counts is None else rates_without(counts, vote_counts(rows))
        xs.append(features(cands, own_rates, qcat, attributes=with_attributes))
        votes = rows["vote"].to_numpy(dtype=np.int64)
        ys.append((votes > 0).astype(np.int64))
        qs.append(np.full(len(rows), str(qid), dtype=object))
        ps.append(rows["rank"].to_numpy(dtype=np.int64))
        truth = rows["grade"].to_numpy(dtype=np.float64) if "grade" in rows else votes > 0
        rel.append(np.asarray(truth, dtype=np.float64))
    if not xs:
        raise ValueError("no sessions")
    return Arrays(np.vstack(xs), np.concatenate(ys), np.concatenate(qs), np.concatenate(ps), rel)


def _columns(config: RerankerConfig, data: Arrays) -> np.ndarray:
    """The feature columns a model of ``config`` reads."""
    if config.attributes:
        if data.x.shape[1] == len(FEATURES):
            raise ConfigError(
                f"a reranker with attributes=True needs sessions with {ATTRIBUTE_AGREEMENT}"
            )
        return data.x
    return data.x[:, : len(FEATURES)]


def _orders(model: LearnedReranker | None, data: Arrays) -> list[np.ndarray]:
    out, start = [], 0
    x = _columns(model.cfg, data) if model is not None else data.x
    for rel in data.relevance:
        n = len(rel)
        if model is None:
            out.append(np.arange(n))
        else:
            out.append(model.order(x[start : start + n]))
        start += n
    return out


def rocchio_orders(sessions: pd.DataFrame, vectors: np.ndarray, ids: pd.Index) -> list[np.ndarray]:
    """Per query (as :func:`arrays` groups them): the shown candidates reordered by the query
    moved with the votes cast on that very list (Rocchio, in-session feedback), the disliked
    ones last. Needs ``query_row`` (the query's gallery row) and ``vectors`` (gallery order,
    ``ids`` the image id of each row)."""
    where = pd.Series(np.arange(len(ids)), index=ids)
    out = []
    for _, rows in sessions.groupby("query_id", sort=False):
        rows = rows.sort_values("rank", kind="stable")
        cand = vectors[where.loc[rows["result_image_id"].astype(str)].to_numpy()]
        votes = rows["vote"].to_numpy()
        query = vectors[int(rows["query_row"].iloc[0])]
        moved = rocchio(query, cand[votes > 0], cand[votes < 0])
        score = cand @ moved - 10.0 * (votes < 0)  # disliked results drop out (to the end)
        out.append(np.argsort(-score, kind="stable"))
    return out


def ideal_orders(data: Arrays) -> list[np.ndarray]:
    return [np.argsort(-rel, kind="stable") for rel in data.relevance]


def fit(config: RerankerConfig, train: Arrays) -> LearnedReranker:
    x = _columns(config, train)
    return LearnedReranker(config).fit(x, train.labels, train.query_ids, train.positions)


def compare(
    train_sessions: pd.DataFrame,
    test_sessions: pd.DataFrame,
    candidates: Mapping[str, RerankerConfig | None] | None = None,
    k: int = 10,
    vectors: np.ndarray | None = None,
    ids: pd.Index | None = None,
) -> tuple[pd.DataFrame, dict[str, LearnedReranker]]:
    """Fit each candidate on ``train_sessions`` (vote rates from them only) and measure every
    ordering on ``test_sessions``. Returns a table (one row per ordering, plus ``ideal``) of
    NDCG@k and MAP@R, and the fitted models by name. With the gallery ``vectors`` (and their
    image ``ids``) a ``rocchio`` row is added: in-session relevance feedback on the test lists'
    own votes (a different setting: the user voted on that list first)."""
    candidates = dict(DEFAULT_CANDIDATES if candidates is None else candidates)
    overlap = set(train_sessions["query_id"]) & set(test_sessions["query_id"])
    if overlap:
        raise ValueError(f"{len(overlap)} query ids are in both train and test sessions")
    rates = vote_rates(train_sessions)
    train = arrays(train_sessions, rates, counts=vote_counts(train_sessions))
    test = arrays(test_sessions, rates)
    rows, models = [], {}
    for name, config in candidates.items():
        model = None if config is None else fit(config, train)
        if model is not None:
            model.rates_ = rates  # serving computes the vote-rate features from this table
            models[name] = model
        rows.append({"ranking": name, **ranking_metrics(test.relevance, _orders(model, test), k)})
    if vectors is not None and ids is not None and "query_row" in test_sessions.columns:
        orders = rocchio_orders(test_sessions, vectors, ids)
        rows.append({"ranking": "rocchio", **ranking_metrics(test.relevance, orders, k)})
    rows.append({"ranking": "ideal", **ranking_metrics(test.relevance, ideal_orders(test), k)})
    table = pd.DataFrame(rows).set_index("ranking")
    log.info("reranker comparison on %d test queries:\n%s", len(test.relevance), table)
    return table, models
