"""Search for people: query the registered index (``imgsearch-index@champion``) in-process.

The command line::

    python -m registry.search QUERY.png [MORE.jpg ...] --k 10 --popularity-weight 0.1 \\
        --mmr-lambda 0.7 --exclude-nsfw --category "Animals & Nature" --format table|csv|json

prints one row per (query, rank): ``query, rank, image_id, item_id, score, similarity,
item_name, category`` and the answering model versions. A query image that cannot be used is
reported on stderr with its reason (``ImageRejected``: ``not_an_image``, ``decompression_bomb``,
``file_too_large``, ``empty_file``...) and the others are still answered; the exit code is 0 when
every query was answered, 1 when some were rejected, 2 when none could be.

With ``search.ab.enabled`` both show the online A/B's team-draft interleaved list
(:func:`ab_arms`, :func:`imgsearch.search.interleave.interleave_hits`): each result row carries its
team in ``ab_team``.

The Streamlit page (``app/search_page.py``) uses the same functions: :func:`load_served`
resolves the alias to a version (so the versions shown are the ones that answer) and loads that
version with ``model_config={"allow_paths": ...}``; :func:`read_query` checks a query's bytes
before the model sees them; :func:`search` runs the model.

Settings: ``configs/search.yaml`` (:class:`SearchConfig`).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.data.imageio import open_rgb, read_bytes
from imgsearch.errors import ConfigError, ImageRejected, ImgsearchError
from imgsearch.search.interleave import TEAM, ABConfig, interleave_hits, rng_for
from registry import models, reranker_model
from registry.attributes_model import ATTRIBUTES_MODEL
from registry.integrity import load_verified
from registry.register import CHAMPION, EXTRACTOR_MODEL, INDEX_MODEL, TAG_EXTRACTOR_VERSION
from registry.served_attributes import (
    ServedAttributes,
    attribute_summary,
    load_attributes,
    predict_attributes,
)
from registry.served_rerank import RERANK_DEPTH

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """How the CLI and the search page find the served model and what they allow.

    index_name / alias: the registered index model and the alias that is served.
    extractor_name: the registered extractor (its version is read from the index version's tag).
    k: results per query by default.
    allow_paths: let the in-process model read image paths (the page and CLI are local tools;
      the HTTP server keeps paths off).
    max_upload_mb: uploads larger than this are refused before decoding.
    feedback_url: SQLAlchemy URL of the feedback store ('' = SQLite under IMGSEARCH_HOME).
    catalog_limit: how many catalog images the page offers to pick from.
    grid_columns: results per row on the page.
    use_reranker: rerank with ``imgsearch-reranker@<alias>`` when one is registered for the
      served index version (:mod:`registry.reranker_model`); otherwise the first stage alone.
    caption_columns: catalog columns shown under each result on the page (those present).
    show_attributes: predict the query image's attributes with ``imgsearch-attributes@<alias>``
      when it was trained on the served extractor version (:mod:`registry.served_attributes`).
    ab: the online A/B (:class:`ABConfig`; arms chosen by :func:`ab_arms`).
    """

    index_name: str = INDEX_MODEL
    alias: str = CHAMPION
    extractor_name: str = EXTRACTOR_MODEL
    k: int = models.DEFAULT_K
    allow_paths: bool = True
    max_upload_mb: float = 20.0
    feedback_url: str = ""
    catalog_limit: int = 500
    grid_columns: int = 5
    use_reranker: bool = True
    caption_columns: tuple[str, ...] = ("vendor", "category", "subcategory")
    show_attributes: bool = True
    ab: ABConfig = field(default_factory=ABConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ab, Mapping):  # the ``ab:`` section of configs/search.yaml
            self.ab = from_dict(ABConfig, self.ab)
        if not 1 <= int(self.k) <= models.MAX_K:
            raise ValueError(f"k must be in [1, {models.MAX_K}], got {self.k}")
        if self.max_upload_mb <= 0:
            raise ValueError("max_upload_mb must be positive")

    @property
    def max_upload_bytes(self) -> int:
        return min(int(self.max_upload_mb * 1024 * 1024), models.MAX_IMAGE_BYTES)


def load_search_config(
    profile: str | None = None, overrides: Mapping[str, Any] | None = None
) -> SearchConfig:
    cfg = load_config(profile, overrides)
    return from_dict(SearchConfig, cfg.get("search"))


@dataclass
class Served:
    """The loaded model and which registry versions answer."""

    model: Any  # mlflow.pyfunc.PyFuncModel
    index_name: str
    index_version: str
    alias: str
    extractor_version: str | None
    param_defaults: dict[str, Any]
    extractor_name: str = EXTRACTOR_MODEL
    reranker: Any = None  # a loaded imgsearch-reranker pyfunc for this index version, or None
    reranker_version: str | None = None
    attributes: ServedAttributes = field(default_factory=ServedAttributes)
    ab: ABArms | None = None  # the online A/B when it is on (arm A is the ranking above)

    @property
    def label(self) -> str:
        ext = self.extractor_version or "?"
        rr = f", {reranker_model.RERANKER_MODEL} v{self.reranker_version}" if self.reranker else ""
        attrs = f", {self.attributes.label}" if self.attributes.model is not None else ""
        ab = f"; A/B: {self.ab.label_a} vs {self.ab.label_b}" if self.ab else ""
        return (
            f"{self.index_name} v{self.index_version} (@{self.alias}), {self.extractor_name} v{ext}"
            f"{rr}{attrs}{ab}"
        )

    def catalog(self) -> pd.DataFrame:
        """The index's metadata table (one row per gallery image), empty when unavailable."""
        try:
            inner = self.model.unwrap_python_model()
            return inner.index.meta.copy()
        except (AttributeError, MlflowException):
            return pd.DataFrame(columns=[schema.IMAGE_ID, schema.ITEM_ID])


def champion_version(cfg: SearchConfig, client: MlflowClient | None = None) -> str:
    """The version ``cfg.alias`` points at now (a cheap registry read, no model load)."""
    client = client or MlflowClient()
    return str(client.get_model_version_by_alias(cfg.index_name, cfg.alias).version)


def _alias_version(client: MlflowClient, name: str, alias: str) -> str:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return ""


def served_versions(cfg: SearchConfig, client: MlflowClient | None = None) -> tuple[str, ...]:
    """What a loaded :class:`Served` is made of now, by cheap alias reads (no model load): the
    index version, then the versions the reranker, the A/B challenger and the attribute heads'
    aliases point at (``""`` where none or unused). A long-lived page keys its loaded model on
    this, so a promoted reranker or heads are served without a restart, as a promoted index is."""
    client = client or MlflowClient()
    reranker = reranker_model.RERANKER_MODEL
    return (
        champion_version(cfg, client),
        _alias_version(client, reranker, cfg.alias) if cfg.use_reranker else "",
        _alias_version(client, reranker, cfg.ab.challenger) if cfg.ab.enabled else "",
        _alias_version(client, ATTRIBUTES_MODEL, cfg.alias) if cfg.show_attributes else "",
    )


def load_served(
    cfg: SearchConfig, client: MlflowClient | None = None, version: str | None = None
) -> Served:
    """Load ``version`` of the index model, by default the one ``cfg.alias`` points at now."""
    client = client or MlflowClient()
    if version is None:
        version = champion_version(cfg, client)
    mv = client.get_model_version(cfg.index_name, str(version))
    uri = f"models:/{cfg.index_name}/{mv.version}"
    model = load_verified(uri, client=client, model_config={"allow_paths": bool(cfg.allow_paths)})
    params_schema = model.metadata.get_params_schema()
    defaults = {p.name: p.default for p in params_schema.params} if params_schema else {}
    log.info("loaded %s", uri)
    reranker, reranker_version = (
        _reranker(str(mv.version), cfg.alias, client) if cfg.use_reranker else (None, None)
    )
    ab = ab_arms(cfg.ab, str(mv.version), reranker_version, client)
    extractor_version = (mv.tags or {}).get(TAG_EXTRACTOR_VERSION)
    attributes = (
        load_attributes(cfg.alias, extractor_version, client)
        if cfg.show_attributes
        else ServedAttributes(note="show_attributes is false")
    )
    return Served(
        model=model,
        index_name=cfg.index_name,
        index_version=str(mv.version),
        alias=cfg.alias,
        extractor_version=extractor_version,
        param_defaults=defaults,
        extractor_name=cfg.extractor_name,
        reranker=reranker,
        reranker_version=reranker_version,
        attributes=attributes,
        ab=ab,
    )


def _reranker(index_version: str, alias: str, client: MlflowClient) -> tuple[Any, str | None]:
    """The ``alias`` reranker of this index version, or (None, None) with the reason logged:
    none registered, one trained for another index version, or one that fails its checksums
    (then the first stage serves alone: a bad reranker never stops search)."""
    name = reranker_model.RERANKER_MODEL
    try:
        mv = client.get_model_version_by_alias(name, alias)
        reranker_model.check_index(mv, index_version)
        model = load_verified(f"models:/{name}/{mv.version}", client=client)
        if model.unwrap_python_model().reranker.cfg.attributes:
            raise ConfigError(
                f"{name} v{mv.version} was trained with attribute_agreement, which search does "
                "not compute yet"
            )
    except MlflowException:
        log.info("no %s@%s for index v%s", name, alias, index_version)
        return None, None
    except ImgsearchError as exc:  # RerankerMismatchError, ArtifactIntegrityError, ConfigError
        log.warning("%s@%s not used: %s", name, alias, exc)
        return None, None
    log.info("reranking with %s v%s", name, mv.version)
    return model, str(mv.version)


FIRST_STAGE = "first_stage"  # an arm that is the index model's own ranking


@dataclass
class ABArms:
    """The online A/B: arm A is what is served without it (the champion reranker, or the first
    stage), arm B the challenger's ranking (``reranker`` None: the first stage)."""

    label_a: str
    label_b: str
    reranker_b: Any = None


def _arm_label(version: str | None) -> str:
    return f"{reranker_model.RERANKER_MODEL} v{version}" if version else FIRST_STAGE


def ab_arms(
    cfg: ABConfig, index_version: str, served_reranker: str | None, client: MlflowClient
) -> ABArms | None:
    """Arm B for the served index version, or None (no A/B) when ``cfg`` is off or there is
    nothing to compare: ``imgsearch-reranker@<cfg.challenger>`` when one is usable for this
    index version and is not arm A's version; else the first stage when arm A is a reranker;
    else (A is the first stage and no challenger) nothing."""
    if not cfg.enabled:
        return None
    model, version = _reranker(index_version, cfg.challenger, client)
    if model is not None and version != served_reranker:
        arms = ABArms(_arm_label(served_reranker), _arm_label(version), model)
    elif served_reranker is not None:
        arms = ABArms(_arm_label(served_reranker), FIRST_STAGE)
    else:
        log.info("A/B on, but no challenger reranker for index v%s: no A/B", index_version)
        return None
    log.info("A/B: %s (A) vs %s (B), team-draft interleaved", arms.label_a, arms.label_b)
    return arms


def _ranked(
    served: Served,
    frame: pd.DataFrame,
    params: Mapping[str, Any] | None,
    ab_key: str | None = None,
) -> pd.DataFrame:
    """The model's answer, reranked when ``served`` has a reranker: the first stage is asked for
    at least :data:`RERANK_DEPTH` candidates, the reranker orders them, the top k are kept. With
    the A/B on, arm A's and arm B's orders of the same candidates are team-draft interleaved
    (the coin seeded by ``ab_key``: the same key shows the same list)."""
    clean = {k: v for k, v in dict(params or {}).items() if v is not None}
    if served.reranker is None and served.ab is None:
        return served.model.predict(frame, params=clean)
    k = int(clean.get("k", served.param_defaults.get("k", models.DEFAULT_K)))
    depth = max(k, RERANK_DEPTH)
    hits = served.model.predict(frame, params={**clean, "k": depth})
    if served.ab is None:
        return reranker_model.rerank_hits(served.reranker, hits, k)
    arm_a = served.reranker
    ordered_a = hits if arm_a is None else reranker_model.rerank_hits(arm_a, hits, depth)
    arm_b = served.ab.reranker_b
    ordered_b = hits if arm_b is None else reranker_model.rerank_hits(arm_b, hits, depth)
    return interleave_hits(ordered_a, ordered_b, k, rng_for(ab_key))


def read_query(source: bytes | str | Path, max_bytes: int = models.MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a query image, checked: raises :class:`ImageRejected` with a clear reason
    (``empty_file``, ``file_too_large``, ``not_an_image``/the detected type, ``decompression_bomb``,
    ``truncated``...) before the model is asked. ``OSError`` for an unreadable path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageRejected("file_too_large", f"{len(data)} bytes > {max_bytes}")
    else:
        data = read_bytes(source, max_bytes)
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    open_rgb(data)  # decode fully once: a bad file is refused here, with its reason
    return data


def preview(data: bytes) -> Image.Image:
    """The normalised RGB image of checked query bytes (what the model sees before resizing)."""
    return open_rgb(data)


def search(
    served: Served,
    queries: Sequence[bytes],
    params: Mapping[str, Any] | None = None,
    *,
    ab_key: str | None = None,
) -> pd.DataFrame:
    """Ranked results for checked query bytes (one output row per (query, rank)); ``ab_key``
    seeds the A/B's interleaving when it is on."""
    frame = pd.DataFrame({models.IMAGE_COLUMN: [base64.b64encode(q).decode() for q in queries]})
    return _ranked(served, frame, params, ab_key)


# --- command line ------------------------------------------------------------------------------

_OUTPUT_COLUMNS = (
    "query",
    "file",
    "rank",
    schema.IMAGE_ID,
    schema.ITEM_ID,
    "score",
    "similarity",
    schema.ITEM_NAME,
    schema.CATEGORY,
    TEAM,
    "error",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m registry.search",
        description="Search the registered index with query images, or by words (--text).",
    )
    p.add_argument("images", nargs="*", type=Path, help="query image files")
    p.add_argument(
        "--text",
        action="append",
        default=None,
        help="a text query (repeatable); with one image: mixed",
    )
    p.add_argument("--lang", default=None, help="language of the text queries (en, ru, ...)")
    p.add_argument("--text-weight", type=float, default=None, help="image+text mix: text share")
    p.add_argument("--k", type=int, default=None, help="results per query (default: config)")
    p.add_argument("--popularity-weight", type=float, default=None)
    p.add_argument("--mmr-lambda", type=float, default=None, help="diversity; 1.0 = none")
    p.add_argument("--exclude-nsfw", action="store_true", default=None)
    p.add_argument("--category", action="append", default=None, help="keep only (repeatable)")
    p.add_argument("--one-per-item", action="store_true", default=None)
    p.add_argument("--alias", default=None, help="registry alias to query (default: champion)")
    p.add_argument("--index-name", default=None)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--profile", default=None, help="configs/profiles/NAME.yaml")
    return p


def request_params(args: argparse.Namespace, cfg: SearchConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"k": int(args.k if args.k is not None else cfg.k)}
    if args.popularity_weight is not None:
        params["popularity_weight"] = float(args.popularity_weight)
    if args.mmr_lambda is not None:
        params["mmr_lambda"] = float(args.mmr_lambda)
    if args.exclude_nsfw:
        params["exclude_nsfw"] = True
    if args.one_per_item:
        params["one_per_item"] = True
    if args.category:
        params["category"] = ",".join(args.category)
    if getattr(args, "text_weight", None) is not None:
        params["text_weight"] = float(args.text_weight)
    return params


def search_text(
    served: Served,
    texts: Sequence[str],
    lang: str | None = None,
    params: Mapping[str, Any] | None = None,
    image: bytes | None = None,
    *,
    ab_key: str | None = None,
) -> pd.DataFrame:
    """Ranked results for text queries (one per text; ``image`` given: each mixed with it)."""
    frame = pd.DataFrame({"text": list(texts), "lang": [lang] * len(texts)})
    if image is not None:
        frame["image"] = base64.b64encode(image).decode()
    return _ranked(served, frame, params, ab_key)


def _render(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(df.to_dict(orient="records"), default=str, indent=1)
    if fmt == "csv":
        return str(df.to_csv(index=False))
    return str(df.to_string(index=False, na_rep="", float_format=lambda x: f"{x:.4f}"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "search.alias": args.alias,
        "search.index_name": args.index_name,
    }
    cfg = load_search_config(args.profile, overrides)
    params = request_params(args, cfg)
    if args.text:
        return _main_text(args, cfg, params)
    if not args.images:
        print("give query image files, or --text", file=sys.stderr)
        return 2

    good: list[bytes] = []
    good_files: list[str] = []
    rejected = 0
    for path in args.images:
        try:
            good.append(read_query(path, cfg.max_upload_bytes))
            good_files.append(str(path))
        except ImageRejected as exc:
            rejected += 1
            print(f"{path}: rejected: {exc}", file=sys.stderr)
        except OSError as exc:
            rejected += 1
            print(f"{path}: unreadable: {exc.strerror or exc}", file=sys.stderr)
    if not good:
        print("no usable query image", file=sys.stderr)
        return 2
    try:
        served = load_served(cfg)
        out = search(served, good, params)
    except MlflowException as exc:
        print(f"search failed: {exc.message}", file=sys.stderr)
        return 2
    out.insert(1, "file", [good_files[int(q)] for q in out["query"]])
    columns = [c for c in _OUTPUT_COLUMNS if c in out.columns]
    if "error" in columns and out["error"].isna().all():
        columns.remove("error")
    print(f"# {served.label}", file=sys.stderr)
    _print_attributes(served, good, good_files)
    print(_render(out[columns], args.format))
    return 1 if rejected else 0


def _print_attributes(served: Served, queries: list[bytes], files: list[str]) -> None:
    """``# file: predicted category ... (p)`` per query on stderr, or why there are none."""
    if served.attributes.model is None:
        if served.attributes.version is not None:  # registered but refused: say so
            print(f"# attributes: {served.attributes.note}", file=sys.stderr)
        return
    predicted = predict_attributes(served.attributes, queries)
    for q, name in enumerate(files):
        print(f"# {name}: predicted {attribute_summary(predicted, q)}", file=sys.stderr)


def _main_text(args: argparse.Namespace, cfg: SearchConfig, params: dict[str, Any]) -> int:
    """``--text``: one query per text (mixed with the one image when given). A refused query
    (a restricted word, no text encoder) prints why and exits 2."""
    if len(args.images) > 1:
        print("--text mixes with at most one image", file=sys.stderr)
        return 2
    image = read_query(args.images[0], cfg.max_upload_bytes) if args.images else None
    try:
        served = load_served(cfg)
        out = search_text(served, args.text, args.lang, params, image)
    except MlflowException as exc:
        print(f"search refused: {exc.message}", file=sys.stderr)
        return 2
    out.insert(1, "file", [args.text[int(q)] for q in out["query"]])
    columns = [c for c in _OUTPUT_COLUMNS if c in out.columns]
    if "error" in columns and out["error"].isna().all():
        columns.remove("error")
    print(f"# {served.label}", file=sys.stderr)
    print(_render(out[columns], args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
