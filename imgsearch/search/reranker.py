"""A learned reranker over the first-stage candidates, trained from impressions and votes.

Learning to rank as data (features, query groups, labels) in, a model out (LightGBM's ranking
examples). Per candidate of a query, the features (:data:`FEATURES`) are:

* ``similarity``: cosine to the query (first stage);
* ``first_rank``: the first-stage rank (1-based);
* ``popularity``: :func:`imgsearch.search.ranking.popularity` of the item (0..1);
* ``up_rate`` / ``down_rate``: smoothed per-image vote rates from earlier impressions,
  ``(votes + m * prior) / (shown + m)`` (a Beta prior, ``m`` = :data:`PRIOR_STRENGTH`, prior =
  the global rate), so a rarely shown image sits near the global rate rather than at 0 or 1;
* ``category_match``: 1 when the candidate's category is the query's (the query image's own
  category when known, else the first-stage top hit's), else 0;
* ``attribute_agreement`` (only in a reranker configured with ``attributes=True``): how much the
  query's *predicted* attributes (``imgsearch-attributes``: label -> probability per attribute)
  agree with the candidate's *catalog* attributes, :func:`attribute_agreement`. Where no
  attributes model exists the feature is absent (the six above are the whole vector), never
  filled with a constant; a reranker trained with it refuses candidates that lack it
  (:class:`~imgsearch.errors.ConfigError`) instead of ranking on a made-up value.

Two models, one interface (:class:`LearnedReranker`):

* ``lambdarank``: LightGBM LambdaRank (Burges 2010). With ``debias=True`` the first-stage rank
  each candidate was *shown* at is passed as LightGBM's ``position`` and the library models
  position bias itself (unbiased LambdaMART, Hu et al. WWW 2019;
  ``lambdarank_position_bias_regularization``), instead of reading "not clicked at rank 9" as
  "not relevant".
* ``logistic``: scikit-learn ``LogisticRegression`` on standardised features, pointwise
  (the baseline).

Saved as plain text (LightGBM's model text; the logistic coefficients as JSON): never a pickle.
Metrics: :func:`ranking_metrics` gives NDCG@k (scikit-learn's ``ndcg_score``) and MAP@R
(:func:`imgsearch.evaluate.metrics.per_query_metrics`) of orderings against graded relevance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate.metrics import per_query_metrics

log = logging.getLogger(__name__)

FEATURES = ("similarity", "first_rank", "popularity", "up_rate", "down_rate", "category_match")
ATTRIBUTE_AGREEMENT = "attribute_agreement"
#: the features of a reranker with ``attributes=True``
ATTRIBUTE_FEATURES = (*FEATURES, ATTRIBUTE_AGREEMENT)
PRIOR_STRENGTH = 10.0
KINDS = ("lambdarank", "logistic")
MODEL_FILE = "reranker.txt"
SPEC_FILE = "reranker.json"
RATES_FILE = "vote_rates.csv"
FIRST_RANK = "first_rank"
RERANK_SCORE = "rerank_score"


# --- features ------------------------------------------------------------------------------------
def vote_counts(labelled: pd.DataFrame) -> pd.DataFrame:
    """Per shown image: ``shown``, ``up`` and ``down`` counts; ``attrs["prior"]`` holds the
    global (up, down) rates. ``labelled`` as for :func:`vote_rates`."""
    if labelled.empty:
        out = pd.DataFrame(columns=["shown", "up", "down"])
        out.attrs["prior"] = (0.0, 0.0)
        return out
    vote = labelled["vote"].to_numpy()
    g = labelled.assign(up=vote > 0, down=vote < 0).groupby(labelled["result_image_id"].astype(str))
    out = pd.DataFrame({"shown": g.size(), "up": g["up"].sum(), "down": g["down"].sum()})
    out.attrs["prior"] = (float(np.mean(vote > 0)), float(np.mean(vote < 0)))
    return out


def rates_from_counts(counts: pd.DataFrame, strength: float = PRIOR_STRENGTH) -> pd.DataFrame:
    """:func:`vote_counts` -> smoothed ``shown``, ``up_rate``, ``down_rate`` (module docstring)."""
    p_up, p_down = counts.attrs.get("prior", (0.0, 0.0))
    shown = counts["shown"].astype(float)
    out = pd.DataFrame(
        {
            "shown": counts["shown"],
            "up_rate": (counts["up"] + strength * p_up) / (shown + strength),
            "down_rate": (counts["down"] + strength * p_down) / (shown + strength),
        },
        index=counts.index,
    )
    out.attrs["prior"] = (p_up, p_down)
    return out


def vote_rates(labelled: pd.DataFrame, strength: float = PRIOR_STRENGTH) -> pd.DataFrame:
    """Per shown image: ``shown``, ``up_rate``, ``down_rate`` (smoothed; module docstring).

    labelled: rows ``result_image_id`` and ``vote`` (+1, -1, 0 = shown without a vote), as
    :func:`registry.impressions.labelled` gives them. The frame's ``attrs["prior"]`` holds the
    global (up, down) rates, the value of an image never shown.
    """
    return rates_from_counts(vote_counts(labelled), strength)


def rates_without(counts: pd.DataFrame, own: pd.DataFrame) -> pd.DataFrame:
    """The rates of ``counts`` with one query's own rows (``own``, as :func:`vote_counts` gives
    them) taken out: a training row's vote-rate features must not contain its own vote."""
    rest = counts.reindex(own.index).fillna(0) - own
    rest = rest.clip(lower=0)
    rest.attrs["prior"] = counts.attrs.get("prior", (0.0, 0.0))
    return rates_from_counts(rest)


def attribute_agreement(
    candidates: pd.DataFrame, predicted: Mapping[str, Mapping[str, float]]
) -> np.ndarray:
    """(C,) agreement of each candidate's catalog attributes with the query's predicted ones.

    predicted: attribute -> {label: probability} for the query (the top labels the attributes
    model gives; a label it did not list counts 0). Per candidate: the mean, over the predicted
    attributes the candidates have a column for, of the probability the query's prediction gives
    the candidate's own label (a missing catalog value counts 0). No such attribute: zeros.
    """
    names = [a for a in predicted if a in candidates.columns]
    if not names:
        return np.zeros(len(candidates))
    total = np.zeros(len(candidates))
    for name in names:
        probs = {str(k): float(v) for k, v in predicted[name].items()}
        labels = candidates[name].astype("string")
        total += labels.map(probs).astype("Float64").fillna(0.0).to_numpy(dtype=np.float64)
    return total / len(names)


def features(
    candidates: pd.DataFrame,
    rates: pd.DataFrame | None = None,
    query_category: Any = None,
    attributes: bool = False,
) -> np.ndarray:
    """(C, len(FEATURES)) float64 features of one query's candidates; with ``attributes``
    (C, len(ATTRIBUTE_FEATURES)), the last one read from the ``attribute_agreement`` column.

    candidates: first-stage rows in first-stage order with ``image_id``, ``similarity`` and
    optionally ``rank``, ``popularity``, ``category`` (missing: rank = row order, 0, no match).
    Raises :class:`ConfigError` when ``attributes`` is asked for and the column is missing.
    """
    if attributes and ATTRIBUTE_AGREEMENT not in candidates.columns:
        raise ConfigError(
            f"this reranker was trained with {ATTRIBUTE_AGREEMENT} (the query's predicted "
            "attributes vs the candidates'): without an attributes model's predictions for the "
            "query it refuses to rank"
        )
    n = len(candidates)
    ids = candidates[schema.IMAGE_ID].astype(str)
    first_rank = (
        pd.to_numeric(candidates["rank"], errors="coerce").to_numpy(dtype=np.float64)
        if "rank" in candidates.columns
        else np.arange(1, n + 1, dtype=np.float64)
    )
    pop = (
        pd.to_numeric(candidates["popularity"], errors="coerce").fillna(0.0).to_numpy(np.float64)
        if "popularity" in candidates.columns
        else np.zeros(n)
    )
    prior = rates.attrs.get("prior", (0.0, 0.0)) if rates is not None else (0.0, 0.0)
    if rates is not None and len(rates):
        up = ids.map(rates["up_rate"]).fillna(prior[0]).to_numpy(dtype=np.float64)
        down = ids.map(rates["down_rate"]).fillna(prior[1]).to_numpy(dtype=np.float64)
    else:
        up, down = np.full(n, prior[0]), np.full(n, prior[1])
    match = np.zeros(n)
    if schema.CATEGORY in candidates.columns and n:
        cats = candidates[schema.CATEGORY].astype("string")
        wanted = query_category if query_category is not None else cats.iloc[0]
        match = (cats == str(wanted)).fillna(False).to_numpy(dtype=np.float64)
    sim = pd.to_numeric(candidates["similarity"], errors="coerce").to_numpy(dtype=np.float64)
    columns = [sim, first_rank, pop, up, down, match]
    if attributes:
        agree = pd.to_numeric(candidates[ATTRIBUTE_AGREEMENT], errors="coerce")
        columns.append(agree.fillna(0.0).to_numpy(dtype=np.float64))
    return np.column_stack(columns)


# --- models ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RerankerConfig:
    """kind: ``lambdarank`` or ``logistic``; debias: LightGBM position-bias modelling (lambdarank
    only); attributes: use ``attribute_agreement`` too (module docstring); the LightGBM knobs are
    small on purpose (a few features, a few thousand rows)."""

    kind: str = "lambdarank"
    debias: bool = True
    attributes: bool = False
    num_trees: int = 150
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    position_bias_regularization: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"reranker kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_trees < 1 or self.learning_rate <= 0:
            raise ConfigError("num_trees must be >= 1 and learning_rate > 0")


def _group_sizes(query_ids: np.ndarray) -> np.ndarray:
    """Sizes of consecutive runs of equal query ids (rows of a query must be contiguous)."""
    q = np.asarray(query_ids)
    if not len(q):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    if len(np.unique(q)) != len(starts):
        raise ValueError("rows of one query must be contiguous")
    return np.diff(np.r_[starts, len(q)]).astype(np.int64)


class LearnedReranker:
    """Scores candidates; higher is better. ``fit`` returns self; learned state ends in ``_``."""

    def __init__(self, cfg: RerankerConfig | None = None) -> None:
        self.cfg = cfg or RerankerConfig()
        self.booster_: Any = None
        self.coef_: np.ndarray | None = None
        self.intercept_: float = 0.0
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        #: the vote rates of the training sessions, shipped with the model: serving computes
        #: the ``up_rate`` / ``down_rate`` features from the same table as training did
        self.rates_: pd.DataFrame | None = None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ATTRIBUTE_FEATURES if self.cfg.attributes else FEATURES

    def fit(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        query_ids: np.ndarray,
        positions: np.ndarray | None = None,
    ) -> LearnedReranker:
        """x: (N, F) features; labels: (N,) ints >= 0 (graded or clicks); query_ids: (N,), rows
        of a query contiguous; positions: (N,) 1-based ranks the rows were shown at (debias)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        width = len(self.feature_names)
        if x.ndim != 2 or x.shape[1] != width or len(y) != len(x):
            raise ValueError(f"x must be (N, {width}) with N labels, got {x.shape}")
        if self.cfg.kind == "logistic":
            return self._fit_logistic(x, (y > 0).astype(np.int64))
        return self._fit_lambdarank(x, y, _group_sizes(query_ids), positions)

    def _fit_logistic(self, x: np.ndarray, y: np.ndarray) -> LearnedReranker:
        from sklearn.linear_model import LogisticRegression

        if len(np.unique(y)) < 2:
            raise ValueError("logistic reranker needs both positive and negative rows")
        self.mean_, self.scale_ = x.mean(axis=0), x.std(axis=0)
        self.scale_[self.scale_ == 0] = 1.0
        model = LogisticRegression(max_iter=1000, random_state=self.cfg.seed)
        model.fit((x - self.mean_) / self.scale_, y)
        self.coef_, self.intercept_ = model.coef_[0].copy(), float(model.intercept_[0])
        return self

    def _fit_lambdarank(
        self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, positions: np.ndarray | None
    ) -> LearnedReranker:
        import lightgbm as lgb

        params = {
            "objective": "lambdarank",
            "learning_rate": self.cfg.learning_rate,
            "num_leaves": self.cfg.num_leaves,
            "min_data_in_leaf": self.cfg.min_data_in_leaf,
            "lambdarank_position_bias_regularization": self.cfg.position_bias_regularization,
            "seed": self.cfg.seed,
            "deterministic": True,
            "num_threads": 1,
            "verbose": -1,
        }
        position = None
        if self.cfg.debias:
            if positions is None:
                raise ValueError("debias needs the positions the rows were shown at")
            position = np.asarray(positions, dtype=np.int64) - 1  # LightGBM: 0-based ids
        data = lgb.Dataset(x, label=y, group=groups, position=position, free_raw_data=False)
        self.booster_ = lgb.train(params, data, num_boost_round=self.cfg.num_trees)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.cfg.kind == "logistic":
            if self.coef_ is None or self.mean_ is None or self.scale_ is None:
                raise ValueError("reranker is not fitted")
            return np.asarray(((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_)
        if self.booster_ is None:
            raise ValueError("reranker is not fitted")
        return np.asarray(self.booster_.predict(x, num_threads=1), dtype=np.float64)

    def order(self, x: np.ndarray) -> np.ndarray:
        """Candidate indices best first (ties keep the first-stage order)."""
        return np.argsort(-self.score(x), kind="stable")

    # --- persistence: plain text, never a pickle --------------------------------------------------
    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec: dict[str, Any] = {"config": asdict(self.cfg), "features": list(self.feature_names)}
        if self.cfg.kind == "logistic":
            if self.coef_ is None or self.mean_ is None or self.scale_ is None:
                raise ValueError("reranker is not fitted")
            spec |= {
                "coef": self.coef_.tolist(),
                "intercept": self.intercept_,
                "mean": self.mean_.tolist(),
                "scale": self.scale_.tolist(),
            }
        else:
            if self.booster_ is None:
                raise ValueError("reranker is not fitted")
            (directory / MODEL_FILE).write_text(self.booster_.model_to_string())
        if self.rates_ is not None:
            spec["rates_prior"] = list(self.rates_.attrs.get("prior", (0.0, 0.0)))
            self.rates_.rename_axis("image_id").reset_index().to_csv(
                directory / RATES_FILE, index=False
            )
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: Path) -> LearnedReranker:
        directory = Path(directory)
        spec = json.loads((directory / SPEC_FILE).read_text())
        model = cls(RerankerConfig(**spec["config"]))
        if tuple(spec.get("features", ())) != model.feature_names:
            raise ConfigError(
                f"reranker features {spec.get('features')} differ from {model.feature_names}"
            )
        if model.cfg.kind == "logistic":
            model.coef_ = np.asarray(spec["coef"], dtype=np.float64)
            model.intercept_ = float(spec["intercept"])
            model.mean_ = np.asarray(spec["mean"], dtype=np.float64)
            model.scale_ = np.asarray(spec["scale"], dtype=np.float64)
        else:
            import lightgbm as lgb

            model.booster_ = lgb.Booster(model_str=(directory / MODEL_FILE).read_text())
        if (directory / RATES_FILE).is_file():
            rates = pd.read_csv(directory / RATES_FILE, dtype={"image_id": str})
            model.rates_ = rates.set_index("image_id")
            model.rates_.attrs["prior"] = tuple(spec.get("rates_prior", (0.0, 0.0)))
        return model

    def rerank(self, hits: pd.DataFrame, query_column: str = "query") -> pd.DataFrame:
        """First-stage hits (``image_id``, ``similarity``, ``rank``, optionally ``popularity``,
        ``category``, and ``attribute_agreement``, which a reranker trained with it requires;
        several queries told apart by ``query_column``) reordered per query by
        this model: ``rank`` renumbered, the old one kept as ``first_rank``, the model's score
        as ``rerank_score``."""
        if hits.empty:
            return hits.assign(**{FIRST_RANK: [], RERANK_SCORE: []})
        keys = hits[query_column] if query_column in hits.columns else pd.Series(0, hits.index)
        parts = []
        for _, group in hits.groupby(keys, sort=False):
            group = group.sort_values("rank", kind="stable") if "rank" in group else group
            scores = self.score(features(group, self.rates_, attributes=self.cfg.attributes))
            order = np.argsort(-scores, kind="stable")
            out = group.iloc[order].copy()
            out[FIRST_RANK] = group["rank"].to_numpy()[order] if "rank" in group else order + 1
            out[RERANK_SCORE] = scores[order]
            out["rank"] = np.arange(1, len(out) + 1)
            parts.append(out)
        return pd.concat(parts, ignore_index=True)


# --- measurement -----------------------------------------------------------------------------------
def ranking_metrics(
    relevance: Sequence[np.ndarray], orders: Sequence[np.ndarray], k: int = 10
) -> dict[str, float]:
    """Mean NDCG@k (graded gains) and MAP@R (relevance > 0) of per-query orderings.

    relevance[q]: (C_q,) graded true relevance of query q's candidates (first-stage order);
    orders[q]: a permutation of range(C_q), best first. Queries without a relevant candidate are
    left out (counted in ``n_queries_without_relevant``).
    """
    from sklearn.metrics import ndcg_score

    ndcg, ap_r, skipped = [], [], 0
    for rel, order in zip(relevance, orders, strict=True):
        rel = np.asarray(rel, dtype=np.float64)
        if not (rel > 0).any():
            skipped += 1
            continue
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(len(rel))):
            raise ValueError("an order must be a permutation of the candidates")
        scores = np.empty(len(rel))
        scores[order] = np.arange(len(rel), 0, -1)  # best first -> highest score
        ndcg.append(ndcg_score(rel[None, :], scores[None, :], k=k) if len(rel) > 1 else 1.0)
        binary = (rel[order] > 0)[None, :]
        ap_r.append(per_query_metrics(binary, np.array([binary.sum()]), ks=(1,))["ap_at_r"][0])
    return {
        f"ndcg_at_{k}": float(np.mean(ndcg)) if ndcg else float("nan"),
        "map_at_r": float(np.mean(ap_r)) if ap_r else float("nan"),
        "n_queries": float(len(ndcg)),
        "n_queries_without_relevant": float(skipped),
    }
