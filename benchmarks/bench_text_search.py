"""Benchmark text search: text towers and alignment options side by side, against the targets.

Reads a pipeline's runs from a tracking store (default: the newest ``ingest``, ``split`` and
``extract`` runs of ``MLFLOW_TRACKING_URI``, or give their ids), aligns each configuration on the
train items (early stopping on val), and prints, per configuration, the val MAP@R it was chosen
by and the test figures of label queries in English and Russian with the chance level and the
issue's targets (hit@10 >= 0.70 / MAP@R >= 0.35 English, >= 0.65 / >= 0.30 Russian), measured in
one run. Choose a configuration by its val column; the test columns are reported, not tuned on.

    python -m benchmarks.bench_text_search --configs ngram minilm hybrid ngram:prototype

A configuration is ``TOWER[:prototype][:mlp]``. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import time

import mlflow
import pandas as pd
from mlflow import MlflowClient

from imgsearch.embed.files import load_embeddings
from imgsearch.evaluate.text_search import evaluate_text_search
from imgsearch.models.text import make_text_tower
from imgsearch.train.align import AlignConfig, align, check_texts, project
from steps.artifacts import artifact_path

TARGETS = {"en": (0.70, 0.35), "ru": (0.65, 0.30)}


def newest(client: MlflowClient, stage: str) -> str:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`imgsearch.stage` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"no finished {stage!r} run in {mlflow.get_tracking_uri()}")
    return runs[0].info.run_id


def inputs(args: argparse.Namespace, with_paths: bool = False) -> tuple:
    """``(texts, images, embeddings)``, and each image's file path when ``with_paths``."""
    client = MlflowClient()
    extract = args.extract_run_id or newest(client, "extract")
    split = args.split_run_id or newest(client, "split")
    ingest = args.texts_run_id or newest(client, "ingest")
    ids, emb = load_embeddings(artifact_path(extract, "embeddings.parquet"))
    manifest = pd.read_parquet(artifact_path(split, "manifest.parquet"))
    images = pd.DataFrame({"image_id": ids}).merge(
        manifest[["image_id", "item_id", "split"]].astype(str), on="image_id", how="left"
    )
    texts = check_texts(pd.read_parquet(artifact_path(ingest, "texts.parquet")))
    print(f"runs: extract {extract}, split {split}, texts {ingest}; {len(texts)} texts")
    if with_paths:
        paths = images[["image_id"]].merge(
            manifest[["image_id", "path"]].astype(str), on="image_id", how="left"
        )["path"]
        return texts, images, emb, paths
    return texts, images, emb


def run_config(spec: str, texts: pd.DataFrame, images: pd.DataFrame, emb: object) -> dict:
    tower_name, *flags = spec.split(":")
    cfg = AlignConfig(
        image_target="prototype" if "prototype" in flags else "image",
        head="mlp" if "mlp" in flags else "linear",
    )
    tower = make_text_tower(tower_name)
    start = time.perf_counter()
    result = align(texts, images, emb, tower, cfg)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    scores = evaluate_text_search(
        lambda t: project(result.head, tower.encode(t)),
        texts,
        images,
        emb,  # type: ignore[arg-type]
    ).metrics
    row: dict = {
        "config": spec,
        "val_map_at_r": result.val_metrics["val_map_at_r"],
        "epoch": result.best_epoch,
        "seconds": round(seconds, 1),
    }
    for lang, (hit_target, map_target) in TARGETS.items():
        p = f"text_label_{lang}_"
        row[f"{lang}_hit@10"] = scores.get(p + "hit_at_10")
        row[f"{lang}_map@r"] = scores.get(p + "map_at_r")
        row[f"{lang}_hit@10/target"] = (scores.get(p + "hit_at_10") or 0) / hit_target
        row[f"{lang}_map@r/target"] = (scores.get(p + "map_at_r") or 0) / map_target
        row[f"{lang}_chance_hit@10"] = scores.get(f"chance_{p}hit_at_10")
    return row


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The run ids a benchmark reads (default: the newest runs of each stage)."""
    for name in ("--extract-run-id", "--split-run-id", "--texts-run-id"):
        parser.add_argument(name)


def print_table(rows: list[dict]) -> None:
    """The rows as one table, then the issue's targets."""
    pd.set_option("display.width", 250)
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    print(
        "targets (label queries, test items): en hit@10 >= 0.70, MAP@R >= 0.35; ru >= 0.65, >= 0.30"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["ngram", "minilm", "hybrid"])
    add_run_args(parser)
    args = parser.parse_args()
    texts, images, emb = inputs(args)
    print_table([run_config(spec, texts, images, emb) for spec in args.configs])


if __name__ == "__main__":
    main()
