"""Extract: embed every image with a feature extractor (a pretrained CNN without its classifier).

Inputs: ``--preprocess-run-id`` (its ``manifest.parquet``: ``pre_path`` arrays are reused when they
were made with the extractor's own preprocessing), optionally ``--split-run-id`` (its manifest is
used instead, since it carries ``split``; ``pre_path`` is taken from the preprocess run when the
split manifest lacks it), and the extractor: ``--extractor-uri`` (a saved extractor directory, or an
MLflow artifact URI such as ``runs:/<id>/extractor``) or else ``--backbone``/``--weights``
(``configs/extract.yaml``).

``extract.engine`` picks the engine: ``local`` (this process) or ``spark``
(``imgsearch.embed.spark_runner``: one runner per partition on ``extract.spark.master``,
``local[*]`` by default; needs ``pip install '.[spark]'``).

Produces: ``embeddings.parquet`` (``image_id`` + float32 L2-normalised ``embedding``; see
``imgsearch.embed.files.save_embeddings``; with the Spark engine a folder of that name holding one
shard per partition, read the same way by every later stage), ``extractor/`` (``weights.pt`` + ``spec.json``, reload with
``imgsearch.models.backbones.load_extractor``), ``manifest.parquet`` (the embedded rows of the input
manifest), ``quarantine.parquet`` (this stage's failures, stage="extract"), param
``extractor_fingerprint`` and metrics ``n``, ``n_ok``, ``n_failed``, ``n_from_cache``,
``images_per_s``, ``seconds``, ``bf16_used``, ``compile_used``. With ``extract.precision: int8``
(``imgsearch.evaluate.int8``): quantised with ONNX Runtime on train images, kept only when val MAP@R
stays within ``extract.int8.tolerance`` of fp32's, else fp32; metrics ``int8_used``,
``int8_map_at_r_fp32``, ``int8_map_at_r_int8``, ``int8_map_at_r_drop`` and param ``int8_reason``.

With ``extract.extras`` (``auto``: the ``pooled``/``gram`` features ``configs/attributes.yaml``
asks for, when ``attributes.in_main``), the local engine also writes ``extras/``
(:mod:`imgsearch.embed.extras`: float16 features keyed by ``image_id`` from the same forward
pass, with the kinds, ``gram_blocks`` and extractor fingerprint), which ``steps.attributes``
reads instead of the images; tag ``imgsearch.extract.extras`` says whether and why (not). int8
extraction writes none (the heads read fp32 features; the attribute step computes them).

Frozen trunk (:mod:`imgsearch.embed.trunk`, ``configs/trunk.yaml``): with ``--write-trunk`` the
pass also logs ``trunk/``, the outputs of the blocks fine-tuning will freeze
(``finetune.freeze_blocks``, ``finetune.cache_dtype``) for every readable image, and tags
``imgsearch.trunk.written``; with ``--trunk-uri`` (``runs:/<baseline extract run>/trunk``) an
extractor whose frozen part has that artifact's fingerprint runs only its later blocks for the
images in it (metrics ``n_from_trunk``, ``trunk_check_min_cosine``). With extras wanted, the
writing pass computes them in the same forward pass, and the re-extraction computes ``pooled`` in
its partial pass and takes ``gram`` from the trunk's run's ``extras/`` (its Gram blocks lie
inside the frozen part; else a full pass, the reason tagged). Local engine only; not with int8.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.embed.extract import INT8, ExtractConfig, ExtractResult, extract
from imgsearch.embed.extras import Extras, ExtrasSpec, ExtrasWriter
from imgsearch.embed.files import embedding_ids, save_embeddings
from imgsearch.embed.trunk import (
    TRUNK_ARTIFACT,
    TrunkConfig,
    TrunkStore,
    check_splittable,
    extract_writing_trunk,
)
from imgsearch.embed.trunk_read import extract_from_trunk, gram_source
from imgsearch.errors import ConfigError
from imgsearch.evaluate.int8 import extract_int8
from imgsearch.models.backbones import (
    Extractor,
    create_extractor,
    fingerprint,
    load_extractor,
    save_extractor,
)
from imgsearch.train.config import FinetuneConfig
from steps.artifacts import local_artifact
from steps.common import EMBEDDINGS_ARTIFACT, Option, cli, log_df, log_metrics, read_df, stage_run

log = logging.getLogger(__name__)

EXTRAS_ARTIFACT = "extras"  # steps.attributes reads it
TAG_EXTRAS = "imgsearch.extract.extras"


def read_manifest(preprocess_run_id: str, split_run_id: str | None = None) -> pd.DataFrame:
    """The split run's manifest when given (with ``pre_path`` filled in from the preprocess run)."""
    pre = read_df(preprocess_run_id, "manifest.parquet")
    if not split_run_id:
        return pre
    manifest = read_df(split_run_id, "manifest.parquet")
    if schema.PRE_PATH not in manifest.columns and schema.PRE_PATH in pre.columns:
        manifest = manifest.merge(
            pre[[schema.IMAGE_ID, schema.PRE_PATH]], on=schema.IMAGE_ID, how="left"
        )
    return manifest


def load_extractor_uri(uri: str) -> Extractor:
    """A local directory, or any MLflow artifact URI (``runs:/<id>/extractor``, ``s3://...``)."""
    return load_extractor(local_artifact(uri))


def run(
    preprocess_run_id: str,
    split_run_id: str | None = None,
    extractor_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    trunk_uri: str | None = None,
    write_trunk: bool = False,
) -> str:
    with stage_run("extract", overrides, profile) as (active, all_cfg):
        mlflow.set_tag("imgsearch.input.preprocess_run_id", preprocess_run_id)
        if split_run_id:
            mlflow.set_tag("imgsearch.input.split_run_id", split_run_id)
        cfg = from_dict(ExtractConfig, all_cfg.get("extract"))
        manifest = read_manifest(preprocess_run_id, split_run_id)
        if extractor_uri:
            mlflow.log_param("extractor_uri", extractor_uri)
            extractor = load_extractor_uri(extractor_uri)
        else:
            extractor = create_extractor(cfg.backbone, cfg.weights)
        fp = fingerprint(extractor)
        mlflow.log_param("extractor_fingerprint", fp)
        mlflow.set_tags(
            {
                "imgsearch.extractor.name": extractor.spec.name,
                "imgsearch.extractor.weights": extractor.spec.weights,
            }
        )

        mlflow.set_tag("imgsearch.extract.engine", cfg.engine)
        metadata = {"extractor_fingerprint": fp, "extractor_name": extractor.spec.name}
        with tempfile.TemporaryDirectory() as tmp:
            extractor_dir = save_extractor(extractor, Path(tmp) / "extractor")
            extras, why = ExtrasSpec.resolve(cfg.extras, all_cfg.get("attributes"))
            unfit = extras.unfit_for(extractor) if extras is not None else ""
            if unfit:  # the attribute step says what is wrong when it runs; extraction goes on
                extras, why = None, unfit
            trunk = trunk_plan(extractor, cfg, all_cfg, trunk_uri, write_trunk, extras)
            if cfg.engine == "spark":
                if extras is not None:
                    why = "the spark engine writes no extras"
                ids, failures = _extract_spark(extractor_dir, manifest, cfg, Path(tmp), metadata)
                mlflow.set_tag(TAG_EXTRAS, f"no: {why}")
            elif trunk is not None:
                ids, failures = _extract_trunk(
                    extractor, manifest, cfg, Path(tmp), metadata, trunk, extras, why
                )
            else:
                ids, failures = _extract_local(
                    extractor, manifest, cfg, Path(tmp), metadata, extras, why
                )
            mlflow.log_artifacts(str(extractor_dir), "extractor")
        log_df(
            manifest[manifest[schema.IMAGE_ID].isin(set(ids))].reset_index(drop=True),
            "manifest.parquet",
        )
        log_df(failures, "quarantine.parquet", view=True)
        return active.info.run_id


def _extract_local(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    tmp: Path,
    metadata: dict[str, str],
    extras: ExtrasSpec | None = None,
    why: str = "",
) -> tuple[Any, pd.DataFrame]:
    # embeddings stream into a memmap, so memory stays flat however large the manifest is
    if cfg.precision == INT8:  # calibrated on train, kept only if val MAP@R holds, else fp32
        result = extract_int8(extractor, manifest, cfg, out=tmp / "embeddings.npy")
        if extras is not None:
            extras, why = None, "precision int8: the attribute step computes fp32 features"
    else:
        result = extract(extractor, manifest, cfg, out=tmp / "embeddings.npy", extras=extras)
    log_metrics(result.metrics)
    if cfg.precision == INT8:  # the vectors' arithmetic, beside the extractor that made them
        precision = str(result.metrics.get("precision_used", "fp32"))
        mlflow.set_tag("imgsearch.extract.precision", precision)
        metadata = {**metadata, "precision": precision}
    return _log_outputs(result, extras, why, tmp, metadata)


def _log_outputs(
    result: ExtractResult,
    extras: ExtrasSpec | None,
    why: str,
    tmp: Path,
    metadata: dict[str, str],
) -> tuple[Any, pd.DataFrame]:
    """Log the embeddings, and ``extras/`` from the pass's writer or the tag saying why there are
    none; returns the ids and the failures."""
    path = save_embeddings(tmp / EMBEDDINGS_ARTIFACT, result.ids, result.embeddings, metadata)
    mlflow.log_artifact(str(path))
    _log_extras(result, extras, why, tmp, metadata)
    return result.ids, result.failures


def _log_extras(
    result: ExtractResult,
    extras: ExtrasSpec | None,
    why: str,
    tmp: Path,
    metadata: dict[str, str],
) -> None:
    """Log ``extras/`` from the pass's writer, or tag why there are none."""
    if extras is not None and isinstance(result.writer, ExtrasWriter):
        try:
            folder = result.writer.save_extras(tmp / EXTRAS_ARTIFACT, extras, metadata)
        except ValueError as exc:  # bf16/compile in use: the attribute step computes its own
            why = str(exc)
        else:
            mlflow.log_artifacts(str(folder), EXTRAS_ARTIFACT)
            mlflow.set_tag(TAG_EXTRAS, f"yes: {'+'.join(extras.kinds)} ({why})")
            return
    mlflow.set_tag(TAG_EXTRAS, f"no: {why}")


@dataclass
class TrunkPlan:
    """Start from ``trunk`` (a store) or write one (``(blocks, dtype)``); ``gram``: the writing
    run's Gram features, when the extras want them (:func:`~imgsearch.embed.trunk_read.gram_source`)."""

    trunk: TrunkStore | tuple[int, str]
    min_cosine: float
    gram: Extras | None = None


def _sibling_extras(trunk_uri: str) -> Path | None:
    """The ``extras/`` beside a ``.../trunk`` artifact (the same run wrote both), or None."""
    if not trunk_uri.rstrip("/").endswith("/" + TRUNK_ARTIFACT):
        return None
    uri = trunk_uri.rstrip("/")[: -len(TRUNK_ARTIFACT)] + EXTRAS_ARTIFACT
    try:
        return local_artifact(uri)
    except (MlflowException, OSError):
        return None


def trunk_plan(
    extractor: Extractor,
    cfg: ExtractConfig,
    all_cfg: dict[str, Any],
    trunk_uri: str | None,
    write_trunk: bool,
    extras: ExtrasSpec | None = None,
) -> TrunkPlan | None:
    """What to do with the frozen trunk: ``(a TrunkStore to start from, or (blocks, dtype) to
    write; trunk.min_cosine)``, or None (a plain pass; the reason is logged and tagged)."""
    tcfg = from_dict(TrunkConfig, all_cfg.get("trunk"))
    if not (trunk_uri and tcfg.reuse) and not (write_trunk and tcfg.write):
        return None
    why = ""
    if cfg.engine != "local":
        why = f"engine {cfg.engine} runs full passes"
    elif cfg.precision == INT8:
        why = "extract.precision int8 runs its own quantised model"
    elif trunk_uri and tcfg.reuse:
        mlflow.set_tag("imgsearch.input.trunk_uri", trunk_uri)
        store = TrunkStore(local_artifact(trunk_uri))
        gram: Extras | None = None
        if not store.matches(extractor):
            why = "its frozen part is not this extractor's (fingerprint)"
        elif extras is not None and "gram" in extras.kinds:
            gram, why = gram_source(_sibling_extras(trunk_uri), store, extractor, extras)
            why = f"extras gram: {why}, so a full pass computes them" if why else ""
        if not why:
            mlflow.set_tags(
                {"imgsearch.trunk.reused": "true", "imgsearch.trunk.fingerprint": store.fingerprint}
            )
            return TrunkPlan(store, tcfg.min_cosine, gram)
    else:
        ft = from_dict(FinetuneConfig, all_cfg.get("finetune"))
        blocks = ft.blocks_to_freeze(extractor.spec.name)
        if not ft.caches_trunk(extractor.spec.name):
            why = "fine-tuning does not cache frozen blocks (finetune.augment/cache_frozen)"
        elif ft.train_size and ft.train_size != extractor.spec.preprocess.size:
            why = f"fine-tuning trains at {ft.train_size} px, not {extractor.spec.preprocess.size}"
        elif cfg.precision != "fp32" or cfg.compile:
            why = "extract.precision bf16 / compile change the trunk's outputs"
        else:
            try:
                check_splittable(extractor, blocks)
                return TrunkPlan((blocks, ft.cache_dtype), tcfg.min_cosine)
            except ConfigError as exc:
                why = str(exc)
    log.warning("extract: trunk outputs not used: %s", why)
    mlflow.set_tag("imgsearch.trunk.skipped", why[:250])
    return None


def _extract_trunk(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    tmp: Path,
    metadata: dict[str, str],
    plan: TrunkPlan,
    extras: ExtrasSpec | None = None,
    why: str = "",
) -> tuple[Any, pd.DataFrame]:
    """The local pass that writes ``trunk/`` (``(blocks, dtype)``) or starts from a store; with
    ``extras``, their features too."""
    out = tmp / "embeddings.npy"
    trunk = plan.trunk
    if isinstance(trunk, TrunkStore):
        result = extract_from_trunk(
            extractor,
            manifest,
            cfg,
            trunk,
            out=out,
            min_cosine=plan.min_cosine,
            extras=extras,
            gram=plan.gram,
        )
        if extras is not None and plan.gram is not None:
            why = f"{why}; gram from the trunk's run"
    else:
        result, written = extract_writing_trunk(
            extractor, manifest, cfg, tmp / TRUNK_ARTIFACT, *trunk, out=out, extras=extras
        )
        mlflow.log_artifacts(str(written), TRUNK_ARTIFACT)
        mlflow.set_tags(
            {
                "imgsearch.trunk.written": "true",
                "imgsearch.trunk.fingerprint": TrunkStore(written).fingerprint,
            }
        )
    log_metrics(result.metrics)
    return _log_outputs(result, extras, why, tmp, metadata)


def _extract_spark(
    extractor_dir: Path,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    tmp: Path,
    metadata: dict[str, str],
) -> tuple[Any, pd.DataFrame]:
    from imgsearch.embed.spark_runner import spark_extract

    shards = tmp / EMBEDDINGS_ARTIFACT
    result = spark_extract(extractor_dir, manifest, shards, cfg, metadata=metadata)
    log_metrics(result.metrics)
    mlflow.log_artifacts(str(shards), EMBEDDINGS_ARTIFACT)
    return embedding_ids(shards), result.failures


OPTIONS = (
    Option("--preprocess-run-id", "run whose manifest.parquet (pre_path) to embed", required=True),
    Option("--split-run-id", "run whose manifest.parquet (with split) to embed instead"),
    Option("--extractor-uri", "saved extractor dir or MLflow artifact URI (runs:/<id>/extractor)"),
    Option(
        "--backbone",
        "resnet50 | mobilenet_v2 | efficientnet_b0 | efficientnet_lite0",
        key="extract.backbone",
    ),
    Option(
        "--weights", "imagenet | none | checkpoint path (default: config)", key="extract.weights"
    ),
    Option("--batch-size", "images per forward pass (default: config)", key="extract.batch_size"),
    Option("--precision", "fp32 | bf16 | int8 (default: config)", key="extract.precision"),
    Option("--engine", "local | spark (default: config)", key="extract.engine"),
    Option("--spark-master", "Spark master URL (default: config)", key="extract.spark.master"),
    Option("--trunk-uri", "trunk artifact to start from (runs:/<baseline extract run>/trunk)"),
    Option("--write-trunk", "also log trunk/: the frozen blocks' outputs", flag_only=True),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
