"""Request params of the index model: its signature, their defaults, and one request's ranking.

Each request may override the logged ranking config (``k``, ``popularity_weight``,
``exclude_nsfw``, ``category``, ``mmr_lambda``, ``one_per_item``; ``text_weight`` when the model
answers text queries); a bad value is an ``INVALID_PARAMETER_VALUE``
:class:`~mlflow.exceptions.MlflowException` (HTTP 400).

Relevance feedback params (:data:`FEEDBACK_PARAMS`, see :func:`feedback_for_request`): ``liked``
and ``disliked`` (comma-separated result image ids: the query moves toward the liked and away
from the disliked ones by Rocchio, and the disliked ones are not returned), and ``session`` (an
opaque id written with the impressions when the model's impressions hook is on).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from imgsearch.config import from_dict
from imgsearch.search.ranking import RankingConfig
from registry import text_queries

IMAGE_COLUMN = "image"
MAX_K = 1000


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


#: Request params: name -> (MLflow type, RankingConfig field it sets or None for k/category).
PARAM_TYPES: dict[str, str] = {
    "k": "long",
    "popularity_weight": "double",
    "exclude_nsfw": "boolean",
    "category": "string",
    "mmr_lambda": "double",
    "one_per_item": "boolean",
}
DEFAULT_K = 10
TEXT_WEIGHT = "text_weight"
#: relevance-feedback params (all strings, default ''), declared after the ranking ones
LIKED, DISLIKED, SESSION = "liked", "disliked", "session"
FEEDBACK_PARAMS: dict[str, str] = {LIKED: "string", DISLIKED: "string", SESSION: "string"}
MAX_FEEDBACK_IDS = 100


def index_signature(
    ranking: RankingConfig, k: int = DEFAULT_K, text: bool = False
) -> ModelSignature:
    """Input ``image`` (string) and ranking params whose defaults are the logged ranking config.

    With ``text`` (the model ships an aligned text encoder) the columns are ``image``, ``text``
    and ``lang``, each optional per request, and the param ``text_weight`` mixes a row that has
    both (:mod:`registry.text_queries`).

    ``category`` is a comma-separated list of categories to keep ('' = all); ``mmr_lambda`` is
    the relevance/diversity trade-off of maximal marginal relevance (see :mod:`imgsearch.search.ranking`).
    """
    defaults = param_defaults(ranking, k)
    specs = [ParamSpec(name, PARAM_TYPES[name], defaults[name]) for name in PARAM_TYPES]
    specs += [ParamSpec(name, kind, "") for name, kind in FEEDBACK_PARAMS.items()]
    if not text:
        return ModelSignature(
            inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), params=ParamSchema(specs)
        )
    specs.append(ParamSpec(TEXT_WEIGHT, "double", text_queries.DEFAULT_TEXT_WEIGHT))
    columns: list[ColSpec | TensorSpec] = [
        ColSpec("string", name, required=False)
        for name in (IMAGE_COLUMN, text_queries.TEXT_COLUMN, text_queries.LANG_COLUMN)
    ]
    return ModelSignature(inputs=Schema(columns), params=ParamSchema(specs))


def param_defaults(ranking: RankingConfig, k: int = DEFAULT_K) -> dict[str, Any]:
    categories = getattr(ranking, "categories", None) or []
    if isinstance(categories, str):
        categories = [categories]
    mmr = getattr(ranking, "mmr_lambda", None)
    return {
        "k": int(k),
        "popularity_weight": float(getattr(ranking, "popularity_weight", 0.0) or 0.0),
        "exclude_nsfw": bool(getattr(ranking, "exclude_nsfw", False)),
        "category": ",".join(str(c) for c in categories),
        # None (MMR off) cannot be a param default; 1.0 is pure relevance, the same ranking.
        "mmr_lambda": 1.0 if mmr is None else float(mmr),
        "one_per_item": bool(getattr(ranking, "one_per_item", False)),
    }


def ranking_for_request(
    base: RankingConfig, params: Mapping[str, Any] | None, default_k: int = DEFAULT_K
) -> tuple[int, RankingConfig]:
    """``(k, config)`` for one request: ``base`` with the request's params applied, validated."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_TYPES))
    if unknown:
        raise _invalid(f"unknown params {unknown}; known: {sorted(PARAM_TYPES)}")
    k = _as_int(params.get("k", default_k), "k")
    if not 1 <= k <= MAX_K:
        raise _invalid(f"k must be in [1, {MAX_K}], got {k}")
    changes: dict[str, Any] = {}
    if "popularity_weight" in params:
        changes["popularity_weight"] = _as_float(params["popularity_weight"], "popularity_weight")
    if "mmr_lambda" in params:
        value = _as_float(params["mmr_lambda"], "mmr_lambda")
        if not 0.0 <= value <= 1.0:
            raise _invalid(f"mmr_lambda must be in [0, 1], got {value}")
        # 1.0 is pure relevance, the same order as no MMR: skip the re-ranking work
        changes["mmr_lambda"] = None if value >= 1.0 else value
    for flag in ("exclude_nsfw", "one_per_item"):
        if flag in params:
            changes[flag] = _as_bool(params[flag], flag)
    if "category" in params:
        raw = params["category"]
        items = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
        changes["categories"] = [str(c).strip() for c in items if str(c).strip()] or None
    fields = {f.name for f in dataclasses.fields(base)}
    missing = sorted(set(changes) - fields)
    if missing:
        raise _invalid(f"this index's ranking does not support {missing}")
    try:
        return k, dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"bad ranking params: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class RequestFeedback:
    """A request's relevance feedback: result image ids voted up / down, and its session."""

    liked: tuple[str, ...] = ()
    disliked: tuple[str, ...] = ()
    session: str | None = None

    def __bool__(self) -> bool:
        return bool(self.liked or self.disliked)


def _ids(raw: Any, name: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
    ids = tuple(dict.fromkeys(str(i).strip() for i in items if str(i).strip()))
    if len(ids) > MAX_FEEDBACK_IDS:
        raise _invalid(f"{name}: at most {MAX_FEEDBACK_IDS} ids, got {len(ids)}")
    return ids


def feedback_for_request(params: dict[str, Any]) -> RequestFeedback:
    """Pop the relevance-feedback params out of ``params`` (in place) and validate them: an id
    both liked and disliked is refused (HTTP 400)."""
    liked = _ids(params.pop(LIKED, ""), LIKED)
    disliked = _ids(params.pop(DISLIKED, ""), DISLIKED)
    both = sorted(set(liked) & set(disliked))
    if both:
        raise _invalid(f"ids both liked and disliked: {both}")
    session = str(params.pop(SESSION, "") or "").strip()[:128] or None
    return RequestFeedback(liked, disliked, session)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{name} must be an integer, got {value!r}") from exc
    if not number.is_integer():
        raise _invalid(f"{name} must be an integer, got {value!r}")
    return int(number)


def _as_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise _invalid(f"{name} must be finite, got {value!r}")
    return number


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise _invalid(f"{name} must be a boolean, got {value!r}")


def read_ranking(path: Path | None) -> RankingConfig:
    if path is None or not Path(path).exists():
        return RankingConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(RankingConfig, data)
