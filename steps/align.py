"""Align: a text tower mapped into the image embedding space of one extract run (LiT).

Inputs: ``--extract-run-id`` (its ``embeddings.parquet`` and ``extractor/``), ``--split-run-id``
(``manifest.parquet`` with ``split``), ``--texts-run-id`` (the ingest run: ``texts.parquet`` with
item_id, lang, kind, text), ``configs/align.yaml``. The image side never changes; a projection
from the text tower is trained on ``train`` items, early-stopped on ``val`` text -> image MAP@R
(:mod:`imgsearch.train.align`); items whose texts match the restricted-words policy are left out
of training and listed in ``restricted_items.csv``.

Produces: ``text_encoder/`` (tower + projection + the extractor fingerprint it serves),
metrics ``text_<kind>_<lang>_<metric>`` on the ``test`` split with ``chance_...`` beside them
(:mod:`imgsearch.evaluate.text_search`), ``text_search.csv`` (the headline table),
``text_examples.html`` (example queries with their top-5 thumbnails), ``per_query_text.parquet``,
``history.csv`` and the curves ``align_*`` per epoch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from imgsearch import schema
from imgsearch.config import config_dir, from_dict
from imgsearch.embed.files import load_embeddings
from imgsearch.embed.text_query import TextQueryEncoder
from imgsearch.evaluate.text_report import examples_html
from imgsearch.evaluate.text_search import evaluate_text_search, headline
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.models.text import make_text_tower
from imgsearch.search.restricted import RestrictedPolicy
from imgsearch.train.align import AlignConfig, align, check_texts
from steps.common import (
    EMBEDDINGS_ARTIFACT,
    Option,
    artifact_path,
    cli,
    log_df,
    log_metrics,
    read_df,
    stage_run,
)

log = logging.getLogger(__name__)

TEXTS_ARTIFACT = "texts.parquet"
ENCODER_ARTIFACT = "text_encoder"


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


def run(
    extract_run_id: str,
    split_run_id: str,
    texts_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    with stage_run("align", overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.extract_run_id": extract_run_id,
                "imgsearch.input.split_run_id": split_run_id,
                "imgsearch.input.texts_run_id": texts_run_id,
            }
        )
        section = dict(all_cfg.get("align") or {})
        cfg = from_dict(AlignConfig, section.get("train"))
        texts = check_texts(read_df(texts_run_id, TEXTS_ARTIFACT))
        ids, emb = load_embeddings(artifact_path(extract_run_id, EMBEDDINGS_ARTIFACT))
        images = _images(read_df(split_run_id, "manifest.parquet"), ids)
        policy = RestrictedPolicy.load(config_dir() / str(section.get("policy", "restricted.yaml")))
        blocked = restricted_items(texts, policy)
        kept = texts[~texts[schema.ITEM_ID].isin(set(blocked["item_id"]))]
        log_metrics(
            {"n_texts": len(texts), "n_restricted_texts": len(blocked),
             "n_restricted_items": blocked["item_id"].nunique()}
        )
        tower = make_text_tower(str(section.get("tower", "ngram")), **(section.get("tower_options") or {}))
        result = align(kept, images, emb, tower, cfg)
        for row in result.history:
            log_metrics({f"align_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        log_metrics({**result.val_metrics, "best_epoch": result.best_epoch,
                     "n_train_items": result.n_train_items, "n_train_texts": result.n_train_texts})
        extractor = load_extractor(artifact_path(extract_run_id, "extractor"))
        encoder = TextQueryEncoder(tower, result.head, fingerprint(extractor))
        scores = evaluate_text_search(encoder.encode, kept, images, emb, split="test",
                                      ks=tuple(section.get("ks", (1, 10))))
        log_metrics(scores.metrics)
        log_df(scores.per_query, "per_query_text.parquet")
        mlflow.set_tag("imgsearch.text.extractor_fingerprint", encoder.extractor_fingerprint)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            encoder.save(out / ENCODER_ARTIFACT)
            mlflow.log_artifacts(str(out / ENCODER_ARTIFACT), ENCODER_ARTIFACT)
            table = headline(scores.metrics)
            table.to_csv(out / "text_search.csv", index=False, float_format="%.4f")
            pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
            blocked.to_csv(out / "restricted_items.csv", index=False)
            paths = dict(zip(images[schema.IMAGE_ID], images.get(schema.PATH, pd.Series(dtype=str)).astype(str), strict=False))
            items_of = dict(zip(images[schema.IMAGE_ID], images[schema.ITEM_ID].astype(str), strict=True))
            (out / "text_examples.html").write_text(examples_html(scores.per_query, paths, items_of))
            for name in ("text_search.csv", "history.csv", "restricted_items.csv", "text_examples.html"):
                mlflow.log_artifact(str(out / name))
        log.info("text search (test):\n%s", table.to_string(index=False))
        return active.info.run_id


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT} and extractor/", required=True),
    Option("--split-run-id", "run holding manifest.parquet with split", required=True),
    Option("--texts-run-id", f"run holding {TEXTS_ARTIFACT} (the ingest run)", required=True),
    Option("--tower", "ngram | minilm | hybrid | clip | a sentence-transformers name", key="align.tower"),
    Option("--epochs", "training epochs (default: config)", key="align.train.epochs"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
