"""Attributes: one head per catalog attribute (category, subcategory, style...), scored on test.

Inputs: ``--extract-run-id`` (its ``embeddings.parquet``; when a head reads ``pooled`` or ``gram``
features, its ``extras/`` (written by extraction in the same forward pass) when their kinds,
``gram_blocks`` and extractor match, else its ``extractor/`` and ``manifest.parquet``, computed
here in one forward pass; tag ``imgsearch.attributes.features`` says which and why), ``--split-run-id`` (its ``manifest.parquet``: ``split`` and the attribute
columns), ``configs/attributes.yaml`` (``--model`` overrides it). The library is
:mod:`imgsearch.train.attributes`: heads fitted on train, ``C`` chosen on val, figures on test
(the split is by item, so no test item was seen in training).

Produces: ``attributes/`` (the heads, :func:`imgsearch.models.attribute_heads.load_heads`; with
the extractor fingerprint they were trained on), metrics ``<attr>_acc_at_1``, ``<attr>_acc_at_3``,
``<attr>_macro_f1``, ``<attr>_majority_acc_at_{1,3}``, ``<attr>_knn_acc_at_{1,3}``,
``<attr>_c``, ``<attr>_train_imbalance``..., ``summary.csv``, ``per_class/<attr>.csv``,
``predictions/<attr>.parquet`` + ``.csv`` (test rows, top-3 with probabilities),
``plots/confusion_<attr>.png``, and ``quarantine.parquet`` (images whose features failed).

With ``register: true`` (the default; ``--no-register`` turns it off) the heads are registered
as ``imgsearch-attributes`` (:mod:`registry.attributes_model`: the heads with their extractor,
checksummed), tied to the registered ``imgsearch-extractor`` version with the same fingerprint
(tag ``extractor_version``); the version gets the alias ``champion`` when that
extractor version is the champion's. Heads of an extractor that is not registered (the step run
on its own before ``register``) are not registered: the tag ``imgsearch.attributes.registered``
says why.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.embed.extras import Extras, extras_mismatch, load_extras, read_meta
from imgsearch.embed.files import embeddings_metadata, load_embeddings
from imgsearch.embed.style import manifest_features
from imgsearch.evaluate.classification import confusion_plot
from imgsearch.models.attribute_heads import save_heads
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.train.attributes import AttributesConfig, AttributesResult, train_attributes
from registry.attributes_model import ATTRIBUTES_MODEL, log_attributes_model
from registry.tags import CHAMPION, EXTRACTOR_MODEL, TAG_FINGERPRINT
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
from steps.extract import EXTRAS_ARTIFACT, TAG_EXTRAS

log = logging.getLogger(__name__)

HEADS_ARTIFACT = "attributes"
EXTRACTOR_ARTIFACT = "extractor"  # steps.extract writes it
TAG_REGISTERED = "imgsearch.attributes.registered"
TAG_FEATURES = "imgsearch.attributes.features"  # where pooled/gram features came from, and why


def _manifest(extract_run_id: str, split_run_id: str) -> pd.DataFrame:
    """The split run's manifest, with ``pre_path`` from the extract run's where it lacks one."""
    manifest = read_df(split_run_id, "manifest.parquet").astype({schema.IMAGE_ID: str})
    if schema.PRE_PATH not in manifest.columns:
        try:
            extracted = read_df(extract_run_id, "manifest.parquet").astype({schema.IMAGE_ID: str})
        except (MlflowException, OSError):  # an extract run without a manifest
            return manifest
        if schema.PRE_PATH in extracted.columns:
            manifest = manifest.merge(
                extracted[[schema.IMAGE_ID, schema.PRE_PATH]], on=schema.IMAGE_ID, how="left"
            )
    return manifest


def compute_features(
    extract_run_id: str, manifest: pd.DataFrame, cfg: AttributesConfig
) -> tuple[list[str], dict[str, np.ndarray], str, pd.DataFrame]:
    """``(ids, {kind: (N, D)}, extractor fingerprint, failures)`` for the kinds the heads read:
    the extract run's ``extras/`` when they match (kinds, gram_blocks, extractor), else
    computed from the images in one forward pass (the reason logged and tagged)."""
    emb_path = artifact_path(extract_run_id, EMBEDDINGS_ARTIFACT)
    loaded_ids, emb = load_embeddings(emb_path)
    ids = [str(i) for i in loaded_ids]
    fp = embeddings_metadata(emb_path).get("extractor_fingerprint", "")
    kinds = cfg.feature_kinds()
    extra = [k for k in kinds if k != "embedding"]
    features: dict[str, np.ndarray] = {"embedding": emb} if "embedding" in kinds else {}
    if not extra:
        mlflow.set_tag(TAG_FEATURES, "embeddings only")
        return ids, features, fp, pd.DataFrame()
    saved, why = _saved_extras(extract_run_id, extra, cfg, fp, ids)
    if saved is not None:
        log.info("attributes: %s features from extract run %s's extras", extra, extract_run_id)
        mlflow.set_tag(TAG_FEATURES, f"extract run extras ({'+'.join(extra)})")
        features.update(saved.features)
        return ids, features, fp, pd.DataFrame()
    log.info("attributes: computing %s from the images: %s", extra, why)
    mlflow.set_tag(TAG_FEATURES, f"computed: {why}")
    extractor = load_extractor(artifact_path(extract_run_id, EXTRACTOR_ARTIFACT))
    fp = fingerprint(extractor)
    rows = manifest.set_index(schema.IMAGE_ID).reindex(ids).reset_index()
    computed = manifest_features(extractor, rows, extra, cfg.gram_blocks, cfg.batch_size)
    position = {image_id: i for i, image_id in enumerate(ids)}
    keep = [position[i] for i in computed.ids]
    features = {k: v[keep] for k, v in features.items()}
    features.update(computed.features)
    return computed.ids, features, fp, computed.failures


def _saved_extras(
    extract_run_id: str, kinds: list[str], cfg: AttributesConfig, fp: str, ids: list[str]
) -> tuple[Extras | None, str]:
    """The extract run's extras for ``kinds`` when they match, else ``(None, why not)``."""
    try:
        folder = artifact_path(extract_run_id, EXTRAS_ARTIFACT)
        meta = read_meta(folder)
    except (MlflowException, OSError, ValueError):
        tag = MlflowClient().get_run(extract_run_id).data.tags.get(TAG_EXTRAS, "")
        return None, f"the extract run has no extras ({tag or 'an older extract run'})"
    why = extras_mismatch(meta, kinds, cfg.gram_blocks, fp)
    if why:
        return None, why
    saved = load_extras(folder, kinds)
    if saved.ids != ids:
        return None, "the extras' image ids differ from the embeddings'"
    return saved, ""


def summary(result: AttributesResult, cfg: AttributesConfig) -> pd.DataFrame:
    heads = cfg.heads()
    rows = []
    for name, report in result.reports.items():
        m = report.metrics
        rows.append(
            {
                "attribute": name,
                "features": "+".join(heads[name].features),
                "model": heads[name].model,
                "classes": int(m["train_classes"]),
                **{k: m.get(k) for k in ("acc_at_1", "acc_at_3", "macro_f1")},
                **{
                    f"{b}_{k}": m.get(f"{b}_{k}")
                    for b in ("majority", "knn")
                    for k in ("acc_at_1", "acc_at_3")
                },
                "n_test": int(m["n"]),
                "c": m["c"],
            }
        )
    return pd.DataFrame(rows)


def _log_reports(result: AttributesResult, cfg: AttributesConfig, meta: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary(result, cfg).to_csv(out / "summary.csv", index=False, float_format="%.4f")
        mlflow.log_artifact(str(out / "summary.csv"))
        for sub in ("per_class", "predictions", "plots"):
            (out / sub).mkdir()
        for name, report in result.reports.items():
            report.per_class.to_csv(
                out / "per_class" / f"{name}.csv", index=False, float_format="%.4f"
            )
            report.predictions.to_parquet(out / "predictions" / f"{name}.parquet", index=False)
            report.predictions.to_csv(
                out / "predictions" / f"{name}.csv", index=False, float_format="%.4f"
            )
            confusion_plot(
                report.confusion,
                report.labels,
                out / "plots" / f"confusion_{name}.png",
                title=f"{name}: test confusion (acc@1 {report.metrics['acc_at_1']:.3f})",
            )
        for sub in ("per_class", "predictions", "plots"):
            mlflow.log_artifacts(str(out / sub), sub)
        heads_dir = save_heads(result.heads, out / HEADS_ARTIFACT, meta)
        mlflow.log_artifacts(str(heads_dir), HEADS_ARTIFACT)


def run(
    extract_run_id: str,
    split_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    with stage_run("attributes", overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.extract_run_id": extract_run_id,
                "imgsearch.input.split_run_id": split_run_id,
            }
        )
        section = dict(all_cfg.get("attributes") or {})
        section.pop("in_main", None)  # main's switch, not a head setting
        register = bool(section.pop("register", True))
        cfg = from_dict(AttributesConfig, section)
        manifest = _manifest(extract_run_id, split_run_id)
        ids, features, fp, failures = compute_features(extract_run_id, manifest, cfg)
        if not failures.empty:
            log_df(failures, "quarantine.parquet")
        mlflow.log_param("extractor_fingerprint", fp)
        result = train_attributes(ids, features, manifest, cfg)
        log_metrics(result.metrics)
        log_metrics({"n_feature_failures": len(failures)})
        meta = {
            "extractor_fingerprint": fp,
            "gram_blocks": list(cfg.gram_blocks),
            "feature_kinds": cfg.feature_kinds(),
            "source_run_id": active.info.run_id,
        }
        _log_reports(result, cfg, meta)
        if register:
            _register(active.info.run_id, extract_run_id, fp)
        else:
            mlflow.set_tag(TAG_REGISTERED, "no: register is false")
        return active.info.run_id


def run_if_configured(
    extract_run_id: str,
    split_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str | None:
    """:func:`run`, when ``attributes.in_main`` is on and the split run's catalog has every
    configured attribute column; otherwise ``None`` with the reason in the log (``main`` ends
    with this; the improve job calls it after promoting a new extractor)."""
    cfg = load_config(profile, overrides).get("attributes") or {}
    if not cfg.get("in_main", True):
        log.info("attributes skipped: attributes.in_main is false")
        return None
    wanted = {
        str((spec or {}).get("column", name))
        for name, spec in (cfg.get("attributes") or {}).items()
    }
    columns = set(read_df(split_run_id, "manifest.parquet").columns)
    if not wanted or not wanted <= columns:
        log.info("attributes skipped: the catalog lacks columns %s", sorted(wanted - columns))
        return None
    return run(extract_run_id, split_run_id, overrides=overrides, profile=profile)


def _extractor_version(client: MlflowClient, fp: str) -> ModelVersion | None:
    """The newest registered extractor version with fingerprint ``fp``, if any."""
    try:
        found = client.search_model_versions(
            f"name = '{EXTRACTOR_MODEL}' and tags.{TAG_FINGERPRINT} = '{fp}'"
        )
    except MlflowException:
        return None
    ready = [v for v in found if v.status in ("READY", None)]
    return max(ready, key=lambda v: int(v.version)) if ready else None


def _register(run_id: str, extract_run_id: str, fp: str) -> ModelVersion | None:
    """Register the heads with the extractor they were trained on (see the module docstring)."""
    client = MlflowClient()
    ext_version = _extractor_version(client, fp)
    if ext_version is None:
        why = f"no: no registered {EXTRACTOR_MODEL} version has fingerprint {fp[:12]}"
        log.info("attributes not registered (%s)", why)
        mlflow.set_tag(TAG_REGISTERED, why)
        return None
    try:
        champion = client.get_model_version_by_alias(EXTRACTOR_MODEL, CHAMPION).version
    except MlflowException:
        champion = None
    alias = CHAMPION if str(champion) == str(ext_version.version) else ""
    version = log_attributes_model(
        artifact_path(run_id, HEADS_ARTIFACT),
        artifact_path(extract_run_id, EXTRACTOR_ARTIFACT),
        extractor_version=ext_version,
        source_run_id=run_id,
        alias=alias,
        client=client,
    )
    what = f"{ATTRIBUTES_MODEL} v{version.version} on {EXTRACTOR_MODEL} v{ext_version.version}"
    mlflow.set_tag(TAG_REGISTERED, what + (f" (@{alias})" if alias else ""))
    log.info("registered %s%s", what, f" as {alias}" if alias else "")
    return version


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT} and extractor/", required=True),
    Option("--split-run-id", "run holding manifest.parquet with split", required=True),
    Option("--model", "linear | mlp (default: config)", key="attributes.model"),
    Option("--no-register", "train and score only: do not register the heads", flag_only=True),
)


def _adjust(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    """``--no-register`` (like ``main --no-promote``) is ``attributes.register: false``."""
    if kwargs.pop("no_register", False):
        overrides["attributes.register"] = False


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, OPTIONS, argv, adjust=_adjust)


if __name__ == "__main__":
    main()
