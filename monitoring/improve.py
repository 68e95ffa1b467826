"""The continuous-improvement job: new data -> drift -> (fine-tune) -> re-index -> evaluate -> gate.

    python -m monitoring.improve [--profile ci] [--limit N] [--set improve.min_new_images=100 ...]

``run(profile, overrides)`` is the job the daemon calls (``monitoring.improve:run``); settings in
``configs/improve.yaml`` (:class:`ImproveConfig`). One parent run tagged
``imgsearch.stage=improve``, every step a nested run (``imgsearch.run.<step>`` tags on the parent):

1. champion: ``imgsearch-index@champion`` and its extractor version; their runs give the
   champion's data (the index run's split manifest), its embeddings (the index run's extract run)
   and the frozen test split (its evaluate run's split). No champion: decision ``skip``.
2. ``ingest`` the configured catalog; ``newdata``: rows neither in the watermark of this source
   (:mod:`imgsearch.data.watermark`) nor in the champion's data; a new id with already seen bytes is
   quarantined as ``duplicate_of_seen``.
3. ``validate`` and ``preprocess`` the new rows; ``split`` them with the frozen split's settings
   (by item hash: a new image of a known item lands in that item's split); ``combine``: the
   champion's data plus the new rows (the next generation's data); ``newtest``: the test items
   that got new images, the new data's own evaluation set.
4. ``extract`` the new rows with the champion's extractor, ``merge`` them with the champion's
   embeddings, ``drift`` (new vs the champion's embeddings, calibrated A/A threshold), and
   ``evaluate`` the champion on ``newtest`` (``before.new.*``).
5. decision (:func:`imgsearch.data.watermark.decide`): ``skip`` without new valid data; ``improve`` on
   drift or when new + pending (served, not yet trained on) images reach ``min_new_images``;
   ``wait`` otherwise.
6. ``improve``: ``trainset`` = new train images + the old images of their items + a seeded random
   replay of old train images + every val image; ``finetune`` warm-started from the champion's
   extractor; when that changed the extractor: ``extract`` everything again, ``index`` (rebuilt),
   ``evaluate`` on the frozen test split (what the gate compares: same split hash as the
   champion's) and on ``newtest``, ``register`` the challenger pair, ``promote`` (the gate).
   When the extractor did not change (or on ``wait``, or after a refused fine-tuned challenger):
   ``index`` adds the new vectors to a copy of the champion's index, registered as a new index
   version of the same extractor version, evaluated and gated the same way.
7. tags ``imgsearch.improve.decision`` / ``.reason`` / ``.promoted``, metrics ``n_new``,
   ``n_quarantined``, ``drift_score``, ``drift_detected``, ``before.*`` / ``after.*``, and
   ``summary.json`` + ``summary.md``; then, and only then, the watermark advances (saved
   atomically under ``$IMGSEARCH_HOME/watermarks``; a copy is logged as ``watermark.json``).

A job killed at any point leaves the champion aliases (what is served) and the watermark as they
were: the only writes that matter are the gate's alias moves (all-or-nothing) and the watermark
(``os.replace``), both at the end. The next run redoes the work. A store that fails during the
gate raises :class:`registry.promote.RegistryUnavailableError` (the CLI exits 2): nothing changed.
The daemon's SIGTERM is honoured between steps (:func:`monitoring.daemon.stop_requested`).

Test hook: ``IMGSEARCH_IMPROVE_PAUSE_AT=<step>`` makes the job touch ``$IMGSEARCH_IMPROVE_PAUSE_FILE``
(when set) and sleep 600 s before that step, so a test can SIGKILL it at a known point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.config import from_dict, home_dir, load_config
from imgsearch.data.watermark import (
    decide,
    load_watermark,
    replay_sample,
    save_watermark,
    select_new,
    source_key,
)
from imgsearch.embed.files import load_embeddings, save_embeddings
from imgsearch.errors import CatalogError, ConfigError, ImgsearchError
from imgsearch.search.index import ImageIndex, gallery_meta
from imgsearch.search.ranking import RankingConfig
from monitoring import drift as drift_stage
from monitoring.daemon import IMPROVE_STAGE, stop_requested
from registry import promote as promote_registry
from registry.promote import PromoteConfig
from registry.register import (
    CHAMPION,
    METRIC_TAG_PREFIX,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_SOURCE_RUN,
    TAG_TEST_SPLIT,
    RegisterConfig,
    log_index_model,
)
from steps import evaluate, extract, finetune, index, ingest, preprocess, promote, register, split
from steps import validate as validate_step
from steps.common import (
    PROFILE_ENV,
    artifact_path,
    base_parser,
    log_df,
    log_metrics,
    read_df,
    setup_logging,
)

log = logging.getLogger(__name__)

STAGE = IMPROVE_STAGE
PAUSE_ENV = "IMGSEARCH_IMPROVE_PAUSE_AT"
PAUSE_FILE_ENV = "IMGSEARCH_IMPROVE_PAUSE_FILE"
HEADLINE = ("map_at_r", "map", "hit_at_1", "hit_at_10", "recall_at_10")
INPUT = "imgsearch.input."
__all__ = ["ImproveConfig", "decide", "run", "main"]


@dataclass
class ImproveConfig:
    """``configs/improve.yaml``; see the comments there."""

    min_new_images: int = 500
    max_new_per_run: int | None = None
    finetune: bool = True
    replay_fraction: float = 1.0
    replay_max: int | None = 5000
    replay_same_items: bool = True
    keep_champion_size: bool = True
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    extend_index_on_wait: bool = True
    fallback_extend_on_refusal: bool = True
    watermark_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_new_images < 1:
            raise ConfigError("improve.min_new_images must be >= 1")
        if self.max_new_per_run is not None and self.max_new_per_run < 1:
            raise ConfigError("improve.max_new_per_run must be >= 1 or null")
        if not (self.replay_fraction >= 0 and math.isfinite(self.replay_fraction)):
            raise ConfigError("improve.replay_fraction must be a finite number >= 0")
        if not isinstance(self.finetune_overrides, Mapping):
            raise ConfigError("improve.finetune_overrides must be a mapping of finetune settings")

    @property
    def watermarks(self) -> Path:
        return Path(self.watermark_dir) if self.watermark_dir else home_dir() / "watermarks"


class Stopped(Exception):
    """The daemon asked to stop: the job returns before its next step."""


# --- the champion --------------------------------------------------------------------------------


@dataclass
class Champion:
    """The served pair and the runs its data, embeddings and frozen test split come from."""

    index_version: str
    extractor_version: str
    fingerprint: str
    extractor_run: str  # holds extractor/
    index_run: str  # holds index/ and ranking.yaml
    embeddings_run: str  # embeddings.parquet of every indexed image
    data_run: str  # manifest.parquet (with split, sha256, pre_path) of every indexed image
    frozen_split_run: str  # manifest.parquet whose test rows are the frozen test split
    metrics: dict[str, float]
    test_split_hash: str | None

    @property
    def extractor_uri(self) -> str:
        return f"runs:/{self.extractor_run}/extractor"


def find_champion(client: MlflowClient, index_name: str, extractor_name: str) -> Champion | None:
    """The ``champion`` pair and its lineage; ``None`` when there is no champion yet."""
    version = (promote_registry.aliases(client, index_name) or {}).get(CHAMPION)
    if version is None:
        return None
    idx = client.get_model_version(index_name, str(version))
    tags = idx.tags or {}
    ext_v = tags.get(TAG_EXTRACTOR_VERSION)
    if not ext_v:
        raise ImgsearchError(f"{index_name} v{idx.version} has no {TAG_EXTRACTOR_VERSION} tag")
    ext = client.get_model_version(extractor_name, ext_v)
    index_run = tags.get(TAG_SOURCE_RUN) or str(idx.run_id)
    extractor_run = (ext.tags or {}).get(TAG_SOURCE_RUN) or str(ext.run_id)
    run_tags = client.get_run(index_run).data.tags
    embeddings_run = run_tags.get(f"{INPUT}extract_run_id") or extractor_run
    data_run = run_tags.get(f"{INPUT}split_run_id") or client.get_run(embeddings_run).data.tags.get(
        f"{INPUT}split_run_id"
    )
    if not data_run:
        raise ImgsearchError(f"cannot find the data of {index_name} v{idx.version} (no split run)")
    frozen = data_run
    evaluate_run = tags.get("evaluate_run_id")
    if evaluate_run:
        frozen = client.get_run(evaluate_run).data.tags.get(f"{INPUT}split_run_id") or data_run
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return Champion(
        index_version=str(idx.version),
        extractor_version=str(ext_v),
        fingerprint=str((ext.tags or {}).get(TAG_FINGERPRINT) or tags.get(TAG_FINGERPRINT)),
        extractor_run=extractor_run,
        index_run=index_run,
        embeddings_run=embeddings_run,
        data_run=data_run,
        frozen_split_run=frozen,
        metrics=metrics,
        test_split_hash=tags.get(TAG_TEST_SPLIT),
    )


def champion_quarantine_ids(client: MlflowClient, data_run: str) -> set[str]:
    """Ids the champion's own validate run quarantined (best effort: data -> preprocess -> validate)."""
    try:
        pre = client.get_run(data_run).data.tags.get(f"{INPUT}preprocess_run_id")
        val = client.get_run(pre).data.tags.get(f"{INPUT}validate_run_id") if pre else None
        if not val:
            return set()
        return set(read_df(val, "quarantine.parquet")[schema.IMAGE_ID].dropna().astype(str))
    except (MlflowException, OSError, KeyError) as exc:
        log.info("champion quarantine not found (%s): the watermark covers it after one run", exc)
        return set()


# --- small helpers -------------------------------------------------------------------------------


def _pause_point(step: str) -> None:
    """Test hook (module docstring): sleep before ``step`` so a test can kill the job there."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {step}\n")
    log.warning("%s=%s: pausing 600 s before %s", PAUSE_ENV, step, step)
    time.sleep(600)


def _nested(name: str, stage: str | None = None) -> Any:
    run = mlflow.start_run(run_name=name, nested=True)
    mlflow.set_tag("imgsearch.stage", stage or name)
    return run


def _split_overrides(client: MlflowClient, split_run: str) -> dict[str, Any]:
    """The frozen split's own settings, so new items are assigned the same way."""
    params = client.get_run(split_run).data.params
    out: dict[str, Any] = {}
    for key in ("by", "seed", "fractions", "stratify_by"):
        value = params.get(key)
        if value is None:
            continue
        out[f"split.{key}"] = None if value == "None" else value
    if out.get("split.stratify_by") is not None:
        log.warning("the frozen split is stratified: new items may shift category cut points")
    return {k: v for k, v in out.items() if v is not None}


def _metrics_of(run_id: str | None, prefix: str = "") -> dict[str, float]:
    if not run_id:
        return {}
    metrics = mlflow.get_run(run_id).data.metrics
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if k in HEADLINE}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# --- the job -------------------------------------------------------------------------------------


@dataclass
class JobState:
    """What the job learnt so far; the summary is made from it."""

    decision: str = "skip"
    reason: str = ""
    promoted: bool = False
    index_extended: bool = False
    champion_before: dict[str, str] = field(default_factory=dict)
    champion_after: dict[str, str] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    client: MlflowClient | None = None,
) -> str:
    """Run the job once (see the module docstring); returns the parent run id."""
    profile = profile or os.environ.get(PROFILE_ENV) or None
    user = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
    all_cfg = load_config(profile, user)
    cfg = from_dict(ImproveConfig, all_cfg.get(STAGE))
    promote_cfg = from_dict(PromoteConfig, all_cfg.get("promote"))
    register_cfg = from_dict(RegisterConfig, all_cfg.get("register"))
    client = client or MlflowClient()
    state = JobState()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=STAGE, nested=nested) as parent:
        mlflow.set_tag("imgsearch.stage", STAGE)
        if profile:
            mlflow.set_tag("imgsearch.profile", profile)
        mlflow.log_params({f"improve.{k}": str(v)[:500] for k, v in asdict(cfg).items()})
        if user:
            mlflow.log_params({k: str(v)[:500] for k, v in user.items()})
        job = _Job(cfg, promote_cfg, register_cfg, profile, user, client, state)
        commit: Callable[[], None] | None = None
        try:
            commit = job.execute()
        except Stopped as exc:
            state.decision, state.reason = "stopped", str(exc)
        except BaseException as exc:
            state.decision = "failed"
            state.reason = f"{type(exc).__name__}: {exc}"
            _record(state, failed=True)
            raise
        _record(state)
        if commit is not None:
            commit()  # the watermark moves only now: the decision is logged
        log.info("improve: %s (%s)", state.decision, state.reason)
        return parent.info.run_id


def _record(state: JobState, failed: bool = False) -> None:
    """Tags, metrics and the summary on the parent run (best effort when the job failed)."""
    try:
        mlflow.set_tags(
            {
                "imgsearch.improve.decision": state.decision,
                "imgsearch.improve.reason": state.reason[:5000],
                "imgsearch.improve.promoted": str(state.promoted).lower(),
                "imgsearch.improve.index_extended": str(state.index_extended).lower(),
            }
        )
        log_metrics(state.counts)
        log_metrics({k: v for k, v in state.drift.items() if k != "verdict"})
        log_metrics({f"before.{k}": v for k, v in state.before.items()})
        log_metrics({f"after.{k}": v for k, v in state.after.items()})
        log_metrics({"promoted": float(state.promoted)})
        mlflow.log_dict(state.summary(), "summary.json")
        mlflow.log_text(summary_markdown(state), "summary.md")
    except Exception as exc:
        if not failed:
            raise
        log.error("could not record the failed job's summary: %s", exc)


def summary_markdown(state: JobState) -> str:
    c = state.counts
    lines = [
        f"# improve: {state.decision}",
        "",
        f"**Why**: {state.reason}",
        "",
        "## What was new",
        f"- catalog images: {int(c.get('n_catalog', 0))}, already taken in: "
        f"{int(c.get('n_already_seen', 0))}",
        f"- new: {int(c.get('n_new', 0))} valid, {int(c.get('n_quarantined', 0))} quarantined, "
        f"{int(c.get('n_deferred', 0))} deferred to a later run; pending (served, not trained on): "
        f"{int(c.get('n_pending', 0))}",
        "",
        "## Drift",
    ]
    if state.drift:
        d = state.drift
        lines.append(
            f"- {d.get('verdict', '?')}: score {_fmt(d.get('drift_score'))} vs calibrated "
            f"threshold {_fmt(d.get('drift_threshold'))} (run {state.runs.get('drift', '?')})"
        )
    else:
        lines.append("- not measured")
    lines += ["", "## Metrics (frozen test split; new = the new data's test items)", ""]
    names = sorted(set(state.before) | set(state.after))
    if names:
        lines += ["| metric | champion (before) | after |", "|---|---|---|"]
        for name in names:
            lines.append(
                f"| {name} | {_fmt(state.before.get(name, ''))} | {_fmt(state.after.get(name, ''))} |"
            )
    else:
        lines.append("(no evaluation)")
    lines += ["", "## Gate"]
    for gate in state.gates or [{"reason": "not run"}]:
        lines.append(
            f"- {gate.get('what', '')}: {'promoted' if gate.get('promoted') else 'kept champion'}"
            f" - {gate.get('reason', '')}"
        )
    lines += [
        "",
        f"champion before: {state.champion_before}",
        f"champion after: {state.champion_after}",
        "",
    ]
    return "\n".join(lines)


class _Job:
    def __init__(
        self,
        cfg: ImproveConfig,
        promote_cfg: PromoteConfig,
        register_cfg: RegisterConfig,
        profile: str | None,
        overrides: dict[str, Any],
        client: MlflowClient,
        state: JobState,
    ) -> None:
        self.cfg, self.promote_cfg, self.register_cfg = cfg, promote_cfg, register_cfg
        self.profile, self.overrides, self.client, self.state = profile, overrides, client, state

    # --- plumbing ---------------------------------------------------------------------------
    def kw(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"overrides": {**(extra or {}), **self.overrides}, "profile": self.profile}

    def step(self, name: str) -> None:
        if stop_requested():
            raise Stopped(f"daemon stopping: stopped before step {name}")
        _pause_point(name)

    def done(self, name: str, run_id: str) -> str:
        self.state.runs[name] = run_id
        mlflow.set_tag(f"imgsearch.run.{name}", run_id)
        return run_id

    # --- the flow ---------------------------------------------------------------------------
    def execute(self) -> Callable[[], None] | None:
        """Do the work; return the watermark commit to run once the decision is recorded."""
        st, cfg = self.state, self.cfg
        self.step("champion")
        champ = find_champion(
            self.client, self.promote_cfg.index_name, self.promote_cfg.extractor_name
        )
        if champ is None:
            st.decision, st.reason = "skip", "no champion: run main first"
            return None
        self.champ = champ
        st.champion_before = {
            "index_version": champ.index_version,
            "extractor_version": champ.extractor_version,
        }
        st.champion_after = dict(st.champion_before)
        st.before = {k: v for k, v in champ.metrics.items() if k in HEADLINE}
        mlflow.set_tags(
            {
                "imgsearch.improve.champion_index_version": champ.index_version,
                "imgsearch.improve.champion_extractor_version": champ.extractor_version,
            }
        )

        # new data ------------------------------------------------------------------------
        self.step("ingest")
        ingest_run = self.done("ingest", ingest.run(**self.kw()))
        params = self.client.get_run(ingest_run).data.params
        source = {k: params[k] for k in ("catalog_source", "catalog_data_root") if k in params}
        key = source_key(source)
        wm = load_watermark(cfg.watermarks, key, source)
        old = read_df(champ.data_run, "manifest.parquet")
        old[schema.IMAGE_ID] = old[schema.IMAGE_ID].astype(str)
        seen_ids = set(wm.seen) | set(old[schema.IMAGE_ID])
        rejected_before = champion_quarantine_ids(self.client, champ.data_run) - set(wm.seen)
        seen_ids |= rejected_before
        seen_hashes = wm.seen_hashes()
        if schema.SHA256 in old.columns:
            seen_hashes |= set(old[schema.SHA256].dropna().astype(str))
        self.step("newdata")
        catalog = read_df(ingest_run, "manifest.parquet")
        found = select_new(catalog, seen_ids, seen_hashes, max_new=cfg.max_new_per_run)
        taken = {
            str(i): (None if pd.isna(h) else str(h))
            for i, h in zip(found.new[schema.IMAGE_ID], found.new[schema.SHA256], strict=True)
        }
        taken.update({str(i): None for i in found.duplicates[schema.IMAGE_ID]})
        # what the champion's own validation refused is taken in too (it never becomes "new")
        in_catalog = set(catalog[schema.IMAGE_ID].astype(str))
        taken.update({i: None for i in rejected_before if i in in_catalog})
        st.counts.update(found.metrics())
        pending = sorted(set(wm.untrained) & set(old[schema.IMAGE_ID]))
        st.counts["n_pending"] = float(len(pending))
        with _nested("newdata") as nd:
            mlflow.set_tags({f"{INPUT}ingest_run_id": ingest_run, "imgsearch.watermark.key": key})
            log_metrics(found.metrics())
            log_df(found.new.drop(columns=[schema.SHA256]), "manifest.parquet")
            log_df(found.duplicates, "rejected.parquet")
            mlflow.log_dict(wm.to_dict(), "watermark_before.json")
        self.done("newdata", nd.info.run_id)

        def commit(untrained: list[str] | None = None, trained: list[str] | None = None) -> None:
            new_wm = wm.advanced(
                taken,
                untrained=untrained or [],
                trained=trained or [],
                record={"job_run_id": mlflow.active_run().info.run_id, "decision": st.decision},
            )
            path = save_watermark(new_wm, cfg.watermarks)
            mlflow.log_dict(new_wm.to_dict(), "watermark.json")
            log.info("watermark %s: %d images taken in", path, len(new_wm.seen))

        if found.new.empty:
            st.counts.update({"n_new": 0.0, "n_quarantined": float(len(found.duplicates))})
            st.decision, st.reason = "skip", "no new data"
            if len(found.duplicates):
                st.reason += f" ({len(found.duplicates)} new ids with already seen bytes)"
            return commit if taken else None

        self.step("validate")
        val_run = self.done("validate", validate_step.run(nd.info.run_id, **self.kw()))
        n_quarantined = mlflow.get_run(val_run).data.metrics.get("n_quarantined_total", 0.0)
        st.counts["n_quarantined"] = float(n_quarantined)
        clean = read_df(val_run, "manifest.parquet")
        if clean.empty:
            st.counts["n_new"] = 0.0
            st.decision = "skip"
            st.reason = f"no new valid data ({int(n_quarantined)} new images quarantined)"
            return commit
        self.step("preprocess")
        pre_run = self.done("preprocess", preprocess.run(val_run, **self.kw()))
        self.step("split")
        split_kw = self.kw(_split_overrides(self.client, champ.frozen_split_run))
        new_split_run = self.done("split", split.run(preprocess_run_id=pre_run, **split_kw))
        new_rows = extract.read_manifest(pre_run, new_split_run)
        combined, newtest = self.combine(old, new_rows, pre_run, new_split_run)

        self.step("extract")
        new_extract = self.done(
            "extract",
            extract.run(
                pre_run,
                split_run_id=new_split_run,
                extractor_uri=champ.extractor_uri,
                **self.kw(),
            ),
        )
        new_ids, new_emb = load_embeddings(artifact_path(new_extract, "embeddings.parquet"))
        st.counts["n_new"] = float(len(new_ids))
        self.step("merge")
        merged = self.merge(new_ids, new_emb, combined)

        self.step("drift")
        drift_run = self.done(
            "drift", drift_stage.run(champ.embeddings_run, new_extract, **self.kw())
        )
        dr = mlflow.get_run(drift_run).data
        st.drift = {
            "verdict": dr.tags.get("imgsearch.drift.verdict", "?"),
            **{
                k: float(dr.metrics[k])
                for k in ("drift_score", "drift_threshold", "drift_detected")
                if k in dr.metrics
            },
        }
        self.step("evaluate_before")
        if newtest is not None:
            ev = self.try_evaluate("evaluate_before_new", merged, newtest)
            st.before.update(_metrics_of(ev, "new."))

        decision, reason = decide(
            bool(st.drift.get("drift_detected", 0.0)),
            len(new_ids),
            len(pending),
            cfg.min_new_images,
        )
        st.decision, st.reason = decision, reason
        log.info("improve decision: %s (%s)", decision, reason)
        new_clean = [str(i) for i in new_ids]

        if decision == "wait":
            if not cfg.extend_index_on_wait:
                st.reason += "; new data left pending (extend_index_on_wait: false)"
                return None  # nothing taken in: the next run sees this data again
            self.extend(merged, newtest, combined, "extend (wait)")
            if not st.index_extended:
                return None
            return lambda: commit(untrained=new_clean)

        # improve --------------------------------------------------------------------------
        to_train = set(new_clean) | set(pending)
        ft_run = self.finetune(combined, to_train) if cfg.finetune else None
        if ft_run is None:
            st.reason += (
                "; no fine-tuning ("
                + ("disabled" if not cfg.finetune else "no new training images")
                + ")"
            )
            self.extend(merged, newtest, combined, "extend")
            return (lambda: commit(untrained=new_clean)) if st.index_extended else None
        ft_fp = mlflow.get_run(ft_run).data.params.get("extractor_fingerprint")
        if ft_fp == champ.fingerprint:
            st.reason += "; fine-tuning kept the champion's weights"
            self.extend(merged, newtest, combined, "extend")
            return (lambda: commit(untrained=new_clean)) if st.index_extended else None
        self.rebuild(ft_run, combined, newtest)
        if st.promoted:
            return lambda: commit(trained=sorted(to_train))
        if cfg.fallback_extend_on_refusal:
            self.extend(merged, newtest, combined, "extend (fallback)")
            if st.index_extended:
                return lambda: commit(untrained=new_clean)
        return None  # nothing served the new data: retry with it next run

    # --- data ---------------------------------------------------------------------------------
    def combine(
        self, old: pd.DataFrame, new_rows: pd.DataFrame, pre_run: str, new_split_run: str
    ) -> tuple[str, str | None]:
        """Log the next generation's data (``combine``) and the new data's test set (``newtest``)."""
        new_rows = new_rows.copy()
        new_rows[schema.IMAGE_ID] = new_rows[schema.IMAGE_ID].astype(str)
        conflicts = 0
        if schema.SPLIT in old.columns:
            # a new image of a known item goes where the item is: the frozen split never moves
            items = old.assign(_item=old[schema.ITEM_ID].astype(str)).drop_duplicates("_item")
            item_split = items.set_index("_item")[schema.SPLIT].to_dict()
            known = new_rows[schema.ITEM_ID].astype(str).map(item_split)
            moved = known.notna() & (known != new_rows[schema.SPLIT])
            conflicts = int(moved.sum())
            new_rows.loc[moved, schema.SPLIT] = known[moved]
        combined = pd.concat([old, new_rows], ignore_index=True)
        combined = combined.drop_duplicates(schema.IMAGE_ID, keep="first").reset_index(drop=True)
        with _nested("combine") as cr:
            mlflow.set_tags(
                {
                    f"{INPUT}data_run_id": self.champ.data_run,
                    f"{INPUT}preprocess_run_id": pre_run,
                    f"{INPUT}split_run_id": new_split_run,
                }
            )
            log_metrics(
                {
                    "n_old": len(old),
                    "n_new": len(new_rows),
                    "n_images": len(combined),
                    "n_split_conflicts_fixed": conflicts,
                    **{
                        f"n_new_{s}": int((new_rows[schema.SPLIT] == s).sum())
                        for s in schema.SPLITS
                    },
                }
            )
            log_df(combined, "manifest.parquet")
            log_df(combined[[schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT]], "split.parquet")
        self.done("combine", cr.info.run_id)
        self.new_rows = new_rows

        test_items = set(new_rows.loc[new_rows[schema.SPLIT] == "test", schema.ITEM_ID].astype(str))
        rows = combined[
            combined[schema.ITEM_ID].astype(str).isin(test_items)
            & (combined[schema.SPLIT] == "test")
        ]
        if len(rows) < 2:
            log.info("new data has %d test images: no new-data evaluation", len(rows))
            return cr.info.run_id, None
        with _nested("newtest") as nt:
            mlflow.set_tag(f"{INPUT}split_run_id", cr.info.run_id)
            log_metrics({"n_images": len(rows), "n_items": len(test_items)})
            log_df(rows.reset_index(drop=True), "manifest.parquet")
        return cr.info.run_id, self.done("newtest", nt.info.run_id)

    def merge(self, new_ids: np.ndarray, new_emb: np.ndarray, combined_run: str) -> str:
        """The champion extractor's embeddings of the combined data (old ones reused)."""
        old_ids, old_emb = load_embeddings(
            artifact_path(self.champ.embeddings_run, "embeddings.parquet")
        )
        keep = ~np.isin(old_ids.astype(str), new_ids.astype(str))
        ids = np.concatenate([old_ids[keep], new_ids])
        emb = np.vstack([old_emb[keep], new_emb]).astype(np.float32)
        manifest = read_df(combined_run, "manifest.parquet")
        with _nested("merge", "extract") as mr:
            mlflow.set_tags(
                {
                    "imgsearch.extract.mode": "merge",
                    f"{INPUT}split_run_id": combined_run,
                    f"{INPUT}preprocess_run_id": combined_run,
                    f"{INPUT}reference_run_id": self.champ.embeddings_run,
                    f"{INPUT}new_extract_run_id": self.state.runs["extract"],
                }
            )
            mlflow.log_param("extractor_fingerprint", self.champ.fingerprint)
            mlflow.log_param("extractor_uri", self.champ.extractor_uri)
            with tempfile.TemporaryDirectory() as tmp:
                path = save_embeddings(
                    Path(tmp) / "embeddings.parquet",
                    ids,
                    emb,
                    metadata={"extractor_fingerprint": self.champ.fingerprint},
                )
                mlflow.log_artifact(str(path))
            log_df(
                manifest[manifest[schema.IMAGE_ID].astype(str).isin(set(ids.astype(str)))],
                "manifest.parquet",
            )
            log_metrics({"n": len(ids), "n_reused": int(keep.sum()), "n_new": len(new_ids)})
        return self.done("merge", mr.info.run_id)

    def try_evaluate(self, name: str, extract_run: str, split_run: str | None) -> str | None:
        if split_run is None:
            return None
        try:
            return self.done(name, evaluate.run(extract_run, split_run, **self.kw()))
        except CatalogError as exc:  # too few images: report, do not fail the job
            log.warning("%s skipped: %s", name, exc)
            return None

    def finetune(self, combined_run: str, to_train: set[str]) -> str | None:
        """``trainset`` (new + replay + val) then ``finetune`` from the champion's extractor."""
        cfg, st = self.cfg, self.state
        combined = read_df(combined_run, "manifest.parquet")
        ids = combined[schema.IMAGE_ID].astype(str)
        train = combined[schema.SPLIT] == "train"
        new_train = train & ids.isin(to_train)
        if not new_train.any():
            return None
        old_train = combined[train & ~ids.isin(to_train)]
        n_random = int(round(cfg.replay_fraction * int(new_train.sum())))
        if cfg.replay_max is not None:
            n_random = min(n_random, cfg.replay_max)
        replay = replay_sample(
            old_train[schema.IMAGE_ID].astype(str).tolist(),
            old_train[schema.ITEM_ID].astype(str).tolist(),
            combined.loc[new_train, schema.ITEM_ID].astype(str),
            n_random,
            seed=cfg.seed,
            same_items=cfg.replay_same_items,
        )
        rows = new_train | ids.isin(set(replay)) | (combined[schema.SPLIT] == "val")
        counts = {
            "n_train_new": int(new_train.sum()),
            "n_train_replay": len(replay),
            "n_val": int((combined[schema.SPLIT] == "val").sum()),
        }
        st.counts.update({k: float(v) for k, v in counts.items()})
        with _nested("trainset") as ts:
            mlflow.set_tag(f"{INPUT}split_run_id", combined_run)
            log_metrics(counts)
            log_df(combined[rows].reset_index(drop=True), "manifest.parquet")
        self.done("trainset", ts.info.run_id)
        extra = {f"finetune.{k}": v for k, v in cfg.finetune_overrides.items()}
        if cfg.keep_champion_size:
            spec = json.loads(
                artifact_path(self.champ.extractor_run, "extractor/spec.json").read_text()
            )
            size = (spec.get("preprocess") or {}).get("size")
            if size:
                extra["finetune.train_size"] = int(size)
        self.step("finetune")
        return self.done(
            "finetune",
            finetune.run(ts.info.run_id, extractor_uri=self.champ.extractor_uri, **self.kw(extra)),
        )

    # --- the two ways to a challenger ---------------------------------------------------------
    def rebuild(self, ft_run: str, combined_run: str, newtest: str | None) -> None:
        st = self.state
        self.step("extract_all")
        ex = self.done(
            "extract_all",
            extract.run(
                combined_run,
                split_run_id=combined_run,
                extractor_uri=f"runs:/{ft_run}/extractor",
                **self.kw(),
            ),
        )
        self.step("index")
        ix = self.done("index", index.run(ex, split_run_id=combined_run, **self.kw()))
        self.step("evaluate")
        ev = self.done("evaluate", evaluate.run(ex, self.champ.frozen_split_run, **self.kw()))
        ev_new = self.try_evaluate("evaluate_new", ex, newtest)
        st.after = {**_metrics_of(ev), **_metrics_of(ev_new, "new.")}
        self.step("register")
        self.done("register", register.run(ex, ix, ev, **self.kw()))
        self.gate("fine-tuned challenger")

    def extend(self, merged_run: str, newtest: str | None, combined_run: str, what: str) -> None:
        """Add the new vectors to a copy of the champion's index; register it; gate it."""
        st, champ = self.state, self.champ
        self.step("index_add")
        new_ids = read_df(self.state.runs["extract"], "manifest.parquet")[schema.IMAGE_ID]
        new_ids_set = set(new_ids.astype(str))
        with _nested("index_add", "index") as ir:
            mlflow.set_tags(
                {
                    "imgsearch.index.mode": "add",
                    f"{INPUT}extract_run_id": merged_run,
                    f"{INPUT}split_run_id": combined_run,
                    f"{INPUT}base_index_run_id": champ.index_run,
                }
            )
            base = ImageIndex.load(
                artifact_path(champ.index_run, "index"),
                expected_extractor_fingerprint=champ.fingerprint,
            )
            ids, emb = load_embeddings(artifact_path(merged_run, "embeddings.parquet"))
            in_index = set(base.meta[schema.IMAGE_ID].astype(str))
            pick = np.array([str(i) in new_ids_set and str(i) not in in_index for i in ids])
            manifest = read_df(combined_run, "manifest.parquet")
            n_before = base.count
            base.add(emb[pick], gallery_meta(ids[pick], manifest))
            log_metrics({"count": base.count, "n_added": int(pick.sum()), "count_before": n_before})
            mlflow.set_tag("index.factory", base.factory)
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifacts(str(base.save(Path(tmp) / "index")), "index")
            ranking = artifact_path(champ.index_run, "ranking.yaml")
            mlflow.log_artifact(str(ranking))
        ix = self.done("index_add", ir.info.run_id)
        self.step("evaluate")
        ev = self.done(
            "evaluate_add", evaluate.run(merged_run, champ.frozen_split_run, **self.kw())
        )
        after = _metrics_of(ev)
        if newtest is not None:
            after.update({k: v for k, v in st.before.items() if k.startswith("new.")})
        if not st.after:
            st.after = after
        self.step("register")
        self.register_index(ix, ev)
        self.gate(what, extended=True)

    def register_index(self, index_run: str, evaluate_run: str) -> None:
        """A new version of the index only, bound to the champion's extractor version."""
        import yaml

        rc, champ = self.register_cfg, self.champ
        with _nested("register_index", "register") as rr:
            mlflow.set_tags(
                {"index_run_id": index_run, "evaluate_run_id": evaluate_run, "mode": "index_only"}
            )
            metrics, tags = register._evaluation(evaluate_run, rc)
            ranking_data = yaml.safe_load(artifact_path(index_run, rc.ranking_artifact).read_text())
            section = (
                ranking_data.get("ranking", ranking_data) if isinstance(ranking_data, dict) else {}
            )
            version = log_index_model(
                artifact_path(champ.extractor_run, rc.extractor_artifact),
                artifact_path(index_run, rc.index_artifact),
                from_dict(RankingConfig, section or {}),
                source_run_id=index_run,
                extractor_version=champ.extractor_version,
                metrics=metrics,
                extra_tags=tags,
                default_k=rc.default_k,
                name=rc.index_name,
                extractor_name=rc.extractor_name,
                alias=rc.alias,
                client=self.client,
            )
            if rc.alias:
                self.client.set_registered_model_alias(
                    rc.extractor_name, rc.alias, champ.extractor_version
                )
            mlflow.log_params(
                {
                    "index_version": str(version.version),
                    "extractor_version": champ.extractor_version,
                }
            )
            log_metrics({f"registered.{k}": v for k, v in metrics.items()})
        self.done("register_index", rr.info.run_id)

    def gate(self, what: str, extended: bool = False) -> None:
        st = self.state
        self.step("promote")
        pr = self.done("promote" if not extended else "promote_add", promote.run(**self.kw()))
        tags = mlflow.get_run(pr).data.tags
        promoted = tags.get("promote.promoted") == "true"
        reason = tags.get("promote.reason", "")
        st.gates.append({"what": what, "promoted": promoted, "reason": reason, "run": pr})
        st.reason += f"; {what}: {'promoted' if promoted else 'refused'} ({reason})"
        if promoted:
            if extended:
                st.index_extended = True
            else:
                st.promoted = True
            champ = self.client.get_model_version_by_alias(self.promote_cfg.index_name, CHAMPION)
            st.champion_after = {
                "index_version": str(champ.version),
                "extractor_version": str((champ.tags or {}).get(TAG_EXTRACTOR_VERSION)),
            }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--limit", default="", help="demo catalog: number of emoji (demo.limit)")
    parser.add_argument("--min-new-images", default="", help="improve.min_new_images")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config override, e.g. --set ingest.path=/data/photos (repeatable)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    overrides: dict[str, Any] = {
        "demo.limit": args.limit,
        "improve.min_new_images": args.min_new_images,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=VALUE, not {item!r}")
        overrides[key.strip()] = value
    try:
        run_id = run(args.profile or None, overrides)
    except (ImgsearchError, MlflowException) as exc:
        print(f"improve failed, nothing promoted, watermark unchanged: {exc}", file=sys.stderr)
        return 2
    tags = mlflow.get_run(run_id).data.tags
    print(run_id)
    print(
        f"decision={tags.get('imgsearch.improve.decision')} "
        f"promoted={tags.get('imgsearch.improve.promoted')} "
        f"index_extended={tags.get('imgsearch.improve.index_extended')} "
        f"reason={tags.get('imgsearch.improve.reason')}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
