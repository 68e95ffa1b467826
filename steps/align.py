"""Align: a text tower mapped into the image embedding space of one extract run (LiT).

Inputs: ``--extract-run-id`` (its ``embeddings.parquet`` and ``extractor/``), ``--split-run-id``
(``manifest.parquet`` with ``split``), ``--texts-run-id`` (the ingest run: ``texts.parquet`` with
item_id, lang, kind, text), ``configs/align.yaml``. The image side never changes; a projection
from the text tower is trained on ``train`` items, early-stopped on ``val`` text -> image MAP@R
(:mod:`imgsearch.train.align`); items whose texts match the restricted-words policy are left out
of training and listed in ``restricted_items.csv``.

Produces: ``text_encoder/`` (tower + projection + the extractor fingerprint it serves),
``restricted_policy/`` (the policy file it was trained under),
metrics ``text_<kind>_<lang>_<metric>`` on the ``test`` split with ``chance_...`` beside them
(:mod:`imgsearch.evaluate.text_search`; hit@1, hit@10, MAP@R and counts as metrics, the other
measures in ``text_search_metrics.json``), ``text_search.csv`` (the headline table),
``text_examples.html`` (example queries with their top-5 thumbnails), ``per_query_text.parquet``,
``history.csv`` and the curves ``align_*`` per epoch; ``keywords.parquet`` (top-k catalog
keywords of every image, precision@k on test logged); ``restricted_flags/`` (zero-shot
restricted-content score of every image, the threshold calibrated on val, precision/recall on test).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.categorize.keywords import image_keywords, precision_at_k, vocabulary
from imgsearch.config import config_dir, from_dict, load_config
from imgsearch.embed.files import load_embeddings
from imgsearch.embed.text_query import TextQueryEncoder
from imgsearch.errors import ConfigError
from imgsearch.evaluate.text_report import examples_html
from imgsearch.evaluate.text_search import evaluate_text_search, headline
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.models.text import make_text_tower
from imgsearch.search.restricted import RestrictedPolicy
from imgsearch.search.restricted_images import calibrate, flag_quality, restricted_scores
from imgsearch.train.align import AlignConfig, AlignResult, align, check_texts
from registry.text_queries import ARTIFACT_FLAGS as FLAGS_ARTIFACT
from registry.text_queries import ARTIFACT_POLICY as POLICY_ARTIFACT
from registry.text_queries import ARTIFACT_TEXT as ENCODER_ARTIFACT
from registry.text_queries import FLAGS_FILE, POLICY_FILE
from steps.common import (
    EMBEDDINGS_ARTIFACT,
    PROFILE_ENV,
    Option,
    artifact_path,
    cli,
    log_df,
    log_metrics,
    read_df,
    stage_run,
)
from steps.ingest import TEXTS_ARTIFACT

log = logging.getLogger(__name__)

KEYWORDS_ARTIFACT = "keywords.parquet"


def restricted_items(texts: pd.DataFrame, policy: RestrictedPolicy) -> pd.DataFrame:
    """item_id, lang, text, matched: every text that matches the policy (its item is left out)."""
    rows = []
    for row in texts.itertuples(index=False):
        match = policy.check(str(row.text), lang=str(row.lang))
        if match is not None:
            rows.append(
                {"item_id": row.item_id, "lang": row.lang, "text": row.text, "matched": match.word}
            )
    return pd.DataFrame(rows, columns=["item_id", "lang", "text", "matched"])


def _images(manifest: pd.DataFrame, ids: Any) -> pd.DataFrame:
    cols = [schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT, schema.PATH]
    meta = manifest[[c for c in cols if c in manifest.columns]].astype({schema.IMAGE_ID: str})
    order = pd.DataFrame({schema.IMAGE_ID: [str(i) for i in ids]})
    return order.merge(meta, on=schema.IMAGE_ID, how="left", validate="one_to_one")


def _keywords(
    encoder: TextQueryEncoder, texts: pd.DataFrame, images: pd.DataFrame, emb: np.ndarray, k: int
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Top-k catalog keywords for every image; precision@k on the test images."""
    vocab = vocabulary(texts)
    keywords = image_keywords(images[schema.IMAGE_ID], emb, vocab, encoder.encode, k=k)
    test = images[images[schema.SPLIT] == "test"]
    test_kw = keywords[keywords[schema.IMAGE_ID].isin(set(test[schema.IMAGE_ID]))]
    metrics = precision_at_k(test_kw, test, texts, vocab, k=k)
    metrics["keywords_vocabulary_size"] = float(len(vocab))
    return keywords, metrics


def _flags(
    encoder: TextQueryEncoder,
    policy: RestrictedPolicy,
    blocked: pd.DataFrame,
    images: pd.DataFrame,
    emb: np.ndarray,
    target_recall: float,
    min_precision: float,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Zero-shot restricted-content scores for every image, calibrated on val, measured on test.

    The threshold reaching ``target_recall`` on val is used only when its val precision is at
    least ``min_precision``: a check that would hide most innocent images from text search is
    reported (``restricted_flag_enabled`` 0, its figures logged) and flags nothing."""
    scores = restricted_scores(emb, encoder.encode(policy.terms()))
    truth = images[schema.ITEM_ID].isin(set(blocked["item_id"])).to_numpy()
    split = images[schema.SPLIT].to_numpy()
    flags = pd.DataFrame(
        {schema.IMAGE_ID: images[schema.IMAGE_ID], "score": scores, "restricted_item": truth}
    )
    try:
        cal = calibrate(scores[split == "val"], truth[split == "val"], target_recall)
    except ConfigError as exc:
        log.warning("restricted-content check not calibrated: %s", exc)
        return flags.assign(flagged=False), {}
    test = split == "test"
    quality = flag_quality(scores[test], truth[test], cal.threshold)
    metrics = {f"restricted_flag_test_{k}": v for k, v in quality.items()}
    metrics.update(
        {
            "restricted_flag_threshold": cal.threshold,
            "restricted_flag_val_recall": cal.val_recall,
            "restricted_flag_val_precision": cal.val_precision,
        }
    )
    flagged = scores >= cal.threshold
    enabled = cal.val_precision >= min_precision
    if not enabled:
        log.warning(
            "restricted-content check not used: at val recall %.2f its val precision is %.3f < "
            "%.2f (it would flag %.0f%% of the images); nothing flagged",
            cal.val_recall,
            cal.val_precision,
            min_precision,
            100 * flagged.mean(),
        )
    metrics["restricted_flag_enabled"] = float(enabled)
    metrics["restricted_flag_share_if_enabled"] = float(flagged.mean())
    return flags.assign(flagged=flagged & enabled), metrics


#: the text-search measures logged as metrics (with their chance levels); the rest of the
#: per-kind, per-language scores go to ``text_search_metrics.json`` so the run's metric list stays
#: readable (precision@1 equals hit@1 for one relevant item set; precision/recall@k and
#: R-precision are kept there)
HEADLINE_SUFFIXES = ("hit_at_1", "hit_at_10", "map_at_r", "n_queries", "n_gallery")


def _headline_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics to log, the rest) of :func:`evaluate_text_search`'s flat dict."""
    shown = {k: v for k, v in metrics.items() if k.endswith(HEADLINE_SUFFIXES)}
    return shown, {k: v for k, v in metrics.items() if k not in shown}


def _log_outputs(
    encoder: TextQueryEncoder,
    policy_file: Path,
    flags: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    html: str,
) -> None:
    """The encoder, the policy it was trained under and the image flags, each a directory
    artifact (what ``register`` ships in the index model), then the tables and the page."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        encoder.save(out / ENCODER_ARTIFACT)
        mlflow.log_artifacts(str(out / ENCODER_ARTIFACT), ENCODER_ARTIFACT)
        (out / POLICY_ARTIFACT).mkdir()
        shutil.copyfile(policy_file, out / POLICY_ARTIFACT / POLICY_FILE)
        mlflow.log_artifacts(str(out / POLICY_ARTIFACT), POLICY_ARTIFACT)
        (out / FLAGS_ARTIFACT).mkdir()
        flags.to_parquet(out / FLAGS_ARTIFACT / FLAGS_FILE, index=False)
        mlflow.log_artifacts(str(out / FLAGS_ARTIFACT), FLAGS_ARTIFACT)
        for name, table in tables.items():
            if name.endswith(".parquet"):
                log_df(table, name)
            else:
                table.to_csv(out / name, index=False, float_format="%.4f")
                mlflow.log_artifact(str(out / name))
        (out / "text_examples.html").write_text(html)
        mlflow.log_artifact(str(out / "text_examples.html"))


def _log_training(result: AlignResult) -> None:
    """The curves (``align_*`` per epoch) and the chosen epoch's val figures."""
    for row in result.history:
        log_metrics(
            {f"align_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
        )
    log_metrics(
        {
            **result.val_metrics,
            "best_epoch": result.best_epoch,
            "n_train_items": result.n_train_items,
            "n_train_texts": result.n_train_texts,
        }
    )


def wanted(
    texts_run_id: str, overrides: dict[str, Any] | None = None, profile: str | None = None
) -> bool:
    """Whether the chain should align: ``align.enabled`` and the ingest run has texts."""
    section = (
        load_config(profile or os.environ.get(PROFILE_ENV) or None, overrides).get("align") or {}
    )
    if not section.get("enabled", True):
        return False
    try:
        texts = read_df(texts_run_id, TEXTS_ARTIFACT)
    except (MlflowException, OSError):
        return False
    if texts.empty:
        log.info("align skipped: the catalog has no item texts (ingest run %s)", texts_run_id)
    return not texts.empty


def run(
    extract_run_id: str,
    split_run_id: str,
    texts_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    extractor_run_id: str | None = None,
) -> str:
    """Align a text tower to the embeddings of ``extract_run_id``. ``extractor_run_id``: the run
    whose ``extractor/`` made them, when that is another run (an index extension's merged
    embeddings were made by the champion's extract run); default ``extract_run_id``."""
    with stage_run("align", overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.extract_run_id": extract_run_id,
                "imgsearch.input.extractor_run_id": extractor_run_id or extract_run_id,
                "imgsearch.input.split_run_id": split_run_id,
                "imgsearch.input.texts_run_id": texts_run_id,
            }
        )
        section = dict(all_cfg.get("align") or {})
        cfg = from_dict(AlignConfig, section.get("train"))
        texts = check_texts(read_df(texts_run_id, TEXTS_ARTIFACT))
        ids, emb = load_embeddings(artifact_path(extract_run_id, EMBEDDINGS_ARTIFACT))
        images = _images(read_df(split_run_id, "manifest.parquet"), ids)
        policy_file = config_dir() / str(section.get("policy", "restricted.yaml"))
        policy = RestrictedPolicy.load(policy_file)
        blocked = restricted_items(texts, policy)
        kept = texts[~texts[schema.ITEM_ID].isin(set(blocked["item_id"]))]
        log_metrics(
            {
                "n_texts": len(texts),
                "n_restricted_texts": len(blocked),
                "n_restricted_items": blocked["item_id"].nunique(),
            }
        )
        tower = make_text_tower(
            str(section.get("tower", "ngram")), **(section.get("tower_options") or {})
        )
        result = align(kept, images, emb, tower, cfg)
        _log_training(result)
        extractor = load_extractor(artifact_path(extractor_run_id or extract_run_id, "extractor"))
        encoder = TextQueryEncoder(tower, result.head, fingerprint(extractor))
        mlflow.set_tag("imgsearch.text.extractor_fingerprint", encoder.extractor_fingerprint)
        scores = evaluate_text_search(
            encoder.encode, kept, images, emb, split="test", ks=tuple(section.get("ks", (1, 10)))
        )
        keywords, kw_metrics = _keywords(
            encoder, kept, images, emb, int(section.get("keywords_k", 5))
        )
        flags, flag_metrics = _flags(
            encoder,
            policy,
            blocked,
            images,
            emb,
            float(section.get("flag_target_recall", 0.8)),
            float(section.get("flag_min_precision", 0.5)),
        )
        shown, rest = _headline_metrics(scores.metrics)
        log_metrics({**shown, **kw_metrics, **flag_metrics})
        mlflow.log_dict(rest, "text_search_metrics.json")  # precision/recall@k, R-precision
        table = headline(scores.metrics)
        paths = dict(
            zip(
                images[schema.IMAGE_ID],
                images.get(schema.PATH, pd.Series(dtype=str)).astype(str),
                strict=False,
            )
        )
        items_of = dict(
            zip(images[schema.IMAGE_ID], images[schema.ITEM_ID].astype(str), strict=True)
        )
        _log_outputs(
            encoder,
            policy_file,
            flags,
            {
                "text_search.csv": table,
                "history.csv": pd.DataFrame(result.history),
                "restricted_items.csv": blocked,
                "per_query_text.parquet": scores.per_query,
                KEYWORDS_ARTIFACT: keywords,
            },
            examples_html(scores.per_query, paths, items_of),
        )
        log.info("text search (test):\n%s", table.to_string(index=False))
        return active.info.run_id


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT} and extractor/", required=True),
    Option("--split-run-id", "run holding manifest.parquet with split", required=True),
    Option("--texts-run-id", f"run holding {TEXTS_ARTIFACT} (the ingest run)", required=True),
    Option(
        "--tower",
        "ngram | minilm | hybrid | clip | a sentence-transformers name",
        key="align.tower",
    ),
    Option("--epochs", "training epochs (default: config)", key="align.train.epochs"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
