"""Finetune: contrastive fine-tuning of the feature extractor on the train split.

Inputs: ``--split-run-id`` (its ``manifest.parquet`` with ``split``; ``pre_path`` is filled in from
``--preprocess-run-id`` when given and the split manifest lacks it), the starting extractor:
``--extractor-uri`` (a saved extractor directory or an MLflow artifact URI such as
``runs:/<id>/extractor``) or else ``--backbone``/``--weights`` (default: ``configs/extract.yaml``),
and ``configs/finetune.yaml`` (``--method``, ``--epochs``, ``--train-size``, ``--max-minutes``
override it). See :mod:`imgsearch.train.finetune` for the training itself.

Produces: per-epoch metrics with ``step=epoch`` (epoch 0 = before training): ``loss``, ``lr``,
``val_map_at_r``, ``val_map``, ``val_recall_at_1``, ``val_embedding_std`` (of the embedding the
extractor returns), ``val_map_at_r_backbone``, ``val_map_at_r_head``, ``images_per_s``,
``epoch_seconds``; summary metrics (``best_epoch``, ``best_val_map_at_r``,
``initial_val_map_at_r``, ``epochs_run``, ``train_images_per_s``, ``wall_seconds``...);
``extractor/`` (the best epoch's extractor, ``weights.pt`` + ``spec.json``, reload with
``imgsearch.models.backbones.load_extractor``) with param ``extractor_fingerprint``; ``history.csv``;
``quarantine.parquet`` (images that could not be read, stage="finetune").

``--trunk-uri`` (``runs:/<baseline extract run>/trunk``, see :mod:`imgsearch.embed.trunk`): the
frozen blocks' outputs are read from that artifact when it was made by exactly this extractor's
frozen blocks at ``cache_dtype`` (metric ``n_from_trunk``), instead of being computed.

Checkpoints go to ``checkpoint_dir`` or, when it is null, to
``$IMGSEARCH_HOME/checkpoints/finetune/<key>`` where the key hashes the split run, the starting
extractor and the config: running the same step again after a crash resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from imgsearch.config import from_dict, home_dir
from imgsearch.embed.trunk import TrunkConfig, TrunkStore
from imgsearch.models.backbones import create_extractor, fingerprint, save_extractor
from imgsearch.train.finetune import FinetuneConfig, finetune
from steps.artifacts import local_artifact
from steps.common import Option, cli, log_df, log_metrics, stage_run
from steps.extract import load_extractor_uri, read_manifest

log = logging.getLogger(__name__)


def checkpoint_key(split_run_id: str, start_fingerprint: str, cfg: FinetuneConfig) -> str:
    """A stable name for the checkpoints of one (data, starting extractor, config) combination."""
    settings = {
        k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_dir", "max_minutes")
    }
    text = json.dumps([split_run_id, start_fingerprint, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(
    split_run_id: str,
    preprocess_run_id: str | None = None,
    extractor_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    trunk_uri: str | None = None,
) -> str:
    with stage_run("finetune", overrides, profile) as (active, all_cfg):
        mlflow.set_tag("imgsearch.input.split_run_id", split_run_id)
        if preprocess_run_id:
            mlflow.set_tag("imgsearch.input.preprocess_run_id", preprocess_run_id)
        cfg = from_dict(FinetuneConfig, all_cfg.get("finetune"))
        manifest = (
            read_manifest(preprocess_run_id, split_run_id)
            if preprocess_run_id
            else read_manifest(split_run_id)
        )
        if extractor_uri:
            mlflow.log_param("extractor_uri", extractor_uri)
            start = load_extractor_uri(extractor_uri)
        else:
            extract_cfg = all_cfg.get("extract", {})
            start = create_extractor(
                str(extract_cfg.get("backbone", "mobilenet_v2")),
                str(extract_cfg.get("weights", "imagenet")),
            )
        start_fp = fingerprint(start)
        mlflow.log_param("start_extractor_fingerprint", start_fp)
        if cfg.checkpoint_dir is None:
            key = checkpoint_key(split_run_id, start_fp, cfg)
            cfg.checkpoint_dir = str(home_dir() / "checkpoints" / "finetune" / key)
        mlflow.set_tag("imgsearch.train.finetune.checkpoint_dir", cfg.checkpoint_dir)

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        trunk = open_trunk_uri(trunk_uri, all_cfg)
        result = finetune(start, manifest, cfg, on_epoch=on_epoch, trunk=trunk)
        log_metrics(result.metrics)
        mlflow.set_tag("imgsearch.train.finetune.stop_reason", result.stop_reason)
        fp = fingerprint(result.extractor)
        mlflow.log_param("extractor_fingerprint", fp)
        mlflow.set_tags(
            {
                "imgsearch.extractor.name": result.extractor.spec.name,
                "imgsearch.extractor.weights": result.extractor.spec.weights,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            history = Path(tmp) / "history.csv"
            result.history.to_csv(history, index=False)
            mlflow.log_artifact(str(history))
            mlflow.log_artifacts(
                str(save_extractor(result.extractor, Path(tmp) / "extractor")), "extractor"
            )
        log_df(result.failures, "quarantine.parquet", view=True)
        return active.info.run_id


def open_trunk_uri(trunk_uri: str | None, all_cfg: dict[str, Any]) -> TrunkStore | None:
    """The trunk artifact at ``trunk_uri`` (None without one, or with ``trunk.reuse`` off)."""
    if not trunk_uri or not from_dict(TrunkConfig, all_cfg.get("trunk")).reuse:
        return None
    mlflow.set_tag("imgsearch.input.trunk_uri", trunk_uri)
    return TrunkStore(local_artifact(trunk_uri))


OPTIONS = (
    Option("--split-run-id", "run whose manifest.parquet has split", required=True),
    Option("--preprocess-run-id", "run whose manifest.parquet has pre_path (optional)"),
    Option("--extractor-uri", "saved extractor dir or MLflow artifact URI (runs:/<id>/extractor)"),
    Option("--backbone", "starting backbone (default: extract config)", key="extract.backbone"),
    Option(
        "--weights",
        "imagenet | none | checkpoint path (default: extract config)",
        key="extract.weights",
    ),
    Option("--method", "supcon | simclr | moco (default: config)", key="finetune.method"),
    Option("--epochs", "maximum epochs (default: config)", key="finetune.epochs"),
    Option(
        "--train-size", "training resolution in px (default: config)", key="finetune.train_size"
    ),
    Option("--max-minutes", "time budget (default: config)", key="finetune.max_minutes"),
    Option("--trunk-uri", "frozen blocks' outputs to start from (runs:/<extract run>/trunk)"),
)


def _paper_augment(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    # simclr and moco take their positives from augmented views: their papers' augmentations,
    # whatever the config's supcon recipe (augment: false) says.
    method = str(overrides["finetune.method"]).strip()
    overrides["finetune.augment"] = {} if method in ("simclr", "moco") else ""


def main() -> None:
    cli(run, __doc__, OPTIONS, adjust=_paper_augment)


if __name__ == "__main__":
    main()
