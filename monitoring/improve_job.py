"""The continuous-improvement job's work, step by step (:class:`Job`), and its settings
(:class:`ImproveConfig`, ``configs/improve.yaml``).

:mod:`monitoring.improve` is the entry (``run``, ``python -m monitoring.improve``) and its
docstring describes the flow; this module is the flow itself: the champion, ``newdata``,
``validate`` / ``preprocess`` / ``split`` / ``combine``, ``extract`` / ``merge`` / ``drift``, the
decision, and the two ways to a challenger (fine-tune and rebuild, or add to the served index),
each a nested MLflow run, with the watermark commit returned to the caller to run last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.config import from_dict, home_dir
from imgsearch.data import incremental
from imgsearch.data.watermark import (
    ALERT_NEW_DOMAIN,
    ON_NOVEL,
    NewData,
    Watermark,
    decide,
    load_watermark,
    save_watermark,
    select_new,
    source_key,
)
from imgsearch.embed.files import load_embeddings, save_embeddings
from imgsearch.errors import CatalogError, ConfigError, ImgsearchError
from imgsearch.search.ranking import RankingConfig
from monitoring import drift as drift_stage
from monitoring.champion import INPUT, champion_quarantine_ids, find_champion, split_overrides
from monitoring.daemon import stop_requested
from monitoring.improve_summary import JobState
from registry.promote import PromoteConfig
from registry.register import (
    CHAMPION,
    TAG_EXTRACTOR_VERSION,
    RegisterConfig,
    evaluation,
    log_index_model,
)
from registry.text_queries import TEXT_ARTIFACTS
from registry.versions import describe
from steps import attributes as attributes_step
from steps import evaluate, extract, finetune, ingest, preprocess, split
from steps import validate as validate_step
from steps.chain import Chain, ChainNames, run_chain
from steps.common import (
    EMBEDDINGS_ARTIFACT,
    HEADLINE,
    artifact_path,
    log_df,
    log_metrics,
    read_df,
)
from steps.register import precision_tags
from steps.runs import labelled, start_labelled_run

log = logging.getLogger(__name__)

ROLE = "improve"  # the imgsearch.role tag of the job's runs
PAUSE_ENV = "IMGSEARCH_IMPROVE_PAUSE_AT"
PAUSE_FILE_ENV = "IMGSEARCH_IMPROVE_PAUSE_FILE"
#: the drift run's figures the job keeps (metrics of its parent run, summary.json)
DRIFT_METRICS = (
    "drift_score",
    "drift_threshold",
    "drift_detected",
    "drift_effect",
    "knn_novel_share",
    "knn_distance_ratio",
)


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
    on_novel: str = "review"
    release_held: bool = False
    refit_attributes: bool = True
    watermark_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_new_images < 1:
            raise ConfigError("improve.min_new_images must be >= 1")
        if self.max_new_per_run is not None and self.max_new_per_run < 1:
            raise ConfigError("improve.max_new_per_run must be >= 1 or null")
        if not (self.replay_fraction >= 0 and math.isfinite(self.replay_fraction)):
            raise ConfigError("improve.replay_fraction must be a finite number >= 0")
        if self.on_novel not in ON_NOVEL:
            raise ConfigError(f"improve.on_novel must be one of {ON_NOVEL}, not {self.on_novel!r}")
        if not isinstance(self.finetune_overrides, Mapping):
            raise ConfigError("improve.finetune_overrides must be a mapping of finetune settings")

    @property
    def watermarks(self) -> Path:
        return Path(self.watermark_dir) if self.watermark_dir else home_dir() / "watermarks"


class Stopped(Exception):
    """The daemon asked to stop: the job returns before its next step."""


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
    """A nested run of the job's own (``newdata · improve``, tagged ``imgsearch.role=improve``)."""
    return start_labelled_run(stage or name, name=name)


def _metrics_of(run_id: str | None, prefix: str = "") -> dict[str, float]:
    if not run_id:
        return {}
    metrics = mlflow.get_run(run_id).data.metrics
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if k in HEADLINE}


@dataclass
class Intake:
    """What ``newdata`` found, and what the watermark will take in when the job commits."""

    source_key: str
    watermark: Watermark
    catalog: pd.DataFrame
    found: NewData
    taken: dict[str, str | None]
    pending: list[str]
    run_id: str
    released: list[str] = field(default_factory=list)


class Job:
    """One run of the job: ``execute`` does the work and returns the watermark commit."""

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

    def chain(self, names: ChainNames) -> Chain:
        # the pause points keep their names: extract/index by run, the rest by stage
        def before(stage: str, name: str) -> None:
            self.step(name if stage in ("extract", "index") else stage)

        return Chain(self.kw(), self.done, before, names)

    # --- the flow ---------------------------------------------------------------------------
    def execute(self) -> Callable[[], None] | None:
        """Do the work; return the watermark commit to run once the decision is recorded."""
        st = self.state
        self.step("champion")
        if not self.load_champion():
            st.decision, st.reason = "skip", "no champion: run main first"
            return None
        old = read_df(self.champ.data_run, "manifest.parquet")
        old[schema.IMAGE_ID] = old[schema.IMAGE_ID].astype(str)
        new = self.new_data(old)
        commit = self.committer(new)
        if new.found.new.empty:
            dups = len(new.found.duplicates)
            st.counts.update({"n_new": 0.0, "n_quarantined": float(dups)})
            st.decision, st.reason = "skip", "no new data"
            if dups:
                st.reason += f" ({dups} new ids with already seen bytes)"
            return commit if new.taken else None
        prepared = self.prepare(old, new.run_id)
        if prepared is None:
            return commit
        combined, newtest = prepared
        merged, new_ids = self.embed(combined, newtest)
        drifted = bool(st.drift.get("drift_detected", 0.0))
        kind = st.drift.get("kind")
        decision, reason = decide(
            drifted,
            len(new_ids),
            len(new.pending),
            self.cfg.min_new_images,
            kind=kind,
            novel_share=st.drift.get("knn_novel_share"),
            on_novel=self.cfg.on_novel,
        )
        st.decision, st.reason = decision, reason
        if drifted and kind == "novel" and decision == "wait":
            st.alert = ALERT_NEW_DOMAIN  # held for review: a person decides about training
        log.info("improve decision: %s (%s)", decision, reason)
        new_clean = [str(i) for i in new_ids]
        if decision == "wait":
            return self.on_wait(merged, newtest, combined, commit, new_clean)
        return self.on_improve(merged, newtest, combined, commit, new_clean, new.pending)

    def load_champion(self) -> bool:
        champ = find_champion(
            self.client, self.promote_cfg.index_name, self.promote_cfg.extractor_name
        )
        if champ is None:
            return False
        st, self.champ = self.state, champ
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
        return True

    def new_data(self, old: pd.DataFrame) -> Intake:
        """``ingest`` the catalog, then ``newdata``: what neither the watermark nor the champion has."""
        cfg, champ, st = self.cfg, self.champ, self.state
        self.step("ingest")
        ingest_run = self.done("ingest", ingest.run(**self.kw()))
        params = self.client.get_run(ingest_run).data.params
        source: dict[str, str] = {
            k: params[k] for k in ("catalog_source", "catalog_data_root") if k in params
        }
        key = source_key(source)
        wm = load_watermark(cfg.watermarks, key, source)
        seen_ids = set(wm.seen) | set(old[schema.IMAGE_ID])
        rejected_before = champion_quarantine_ids(self.client, champ.data_run) - set(wm.seen)
        seen_ids |= rejected_before
        seen_hashes = wm.seen_hashes()
        if schema.SHA256 in old.columns:
            seen_hashes |= set(old[schema.SHA256].dropna().astype(str))
        self.step("newdata")
        catalog = read_df(ingest_run, "manifest.parquet")
        found = select_new(catalog, seen_ids, seen_hashes, max_new=cfg.max_new_per_run)
        taken: dict[str, str | None] = {
            str(i): (None if pd.isna(h) else str(h))
            for i, h in zip(found.new[schema.IMAGE_ID], found.new[schema.SHA256], strict=True)
        }
        taken.update({str(i): None for i in found.duplicates[schema.IMAGE_ID]})
        # what the champion's own validation refused is taken in too (it never becomes "new")
        in_catalog = set(catalog[schema.IMAGE_ID].astype(str))
        taken.update({i: None for i in rejected_before if i in in_catalog})
        st.counts.update(found.metrics())
        served = set(old[schema.IMAGE_ID])
        released = sorted(set(wm.held) & served) if self.cfg.release_held else []
        pending = sorted((set(wm.untrained) & served) | set(released))
        st.counts["n_pending"] = float(len(pending))
        st.counts["n_held"] = float(len(set(wm.held) - set(released)))
        with _nested("newdata") as nd:
            mlflow.set_tags({f"{INPUT}ingest_run_id": ingest_run, "imgsearch.watermark.key": key})
            log_metrics(found.metrics())
            log_df(found.new.drop(columns=[schema.SHA256]), "manifest.parquet")
            log_df(found.duplicates, "rejected.parquet", view=True)
            mlflow.log_dict(wm.to_dict(), "watermark_before.json")
        self.done("newdata", nd.info.run_id)
        return Intake(key, wm, catalog, found, taken, pending, nd.info.run_id, released)

    def committer(self, new: Intake) -> Callable[..., None]:
        """The watermark advance, run only once the decision is recorded."""
        st, cfg = self.state, self.cfg

        def commit(
            untrained: list[str] | None = None,
            trained: list[str] | None = None,
            held: list[str] | None = None,
        ) -> None:
            job_run = mlflow.active_run()
            assert job_run is not None  # the commit runs inside the job's parent run
            new_wm = new.watermark.advanced(
                new.taken,
                untrained=untrained or [],
                trained=trained or [],
                held=held or [],
                released=new.released,
                record={"job_run_id": job_run.info.run_id, "decision": st.decision},
            )
            path = save_watermark(new_wm, cfg.watermarks)
            mlflow.log_dict(new_wm.to_dict(), "watermark.json")
            log.info("watermark %s: %d images taken in", path, len(new_wm.seen))

        return commit

    def prepare(self, old: pd.DataFrame, newdata_run: str) -> tuple[str, str | None] | None:
        """``validate``, ``preprocess``, ``split`` the new rows, then ``combine`` (None: none valid)."""
        st = self.state
        self.step("validate")
        val_run = self.done("validate", validate_step.run(newdata_run, **self.kw()))
        n_quarantined = mlflow.get_run(val_run).data.metrics.get("n_quarantined_total", 0.0)
        st.counts["n_quarantined"] = float(n_quarantined)
        if read_df(val_run, "manifest.parquet").empty:
            st.counts["n_new"] = 0.0
            st.decision = "skip"
            st.reason = f"no new valid data ({int(n_quarantined)} new images quarantined)"
            return None
        self.step("preprocess")
        pre_run = self.done("preprocess", preprocess.run(val_run, **self.kw()))
        self.step("split")
        split_kw = self.kw(split_overrides(self.client, self.champ.frozen_split_run))
        new_split_run = self.done("split", split.run(preprocess_run_id=pre_run, **split_kw))
        self.pre_run, self.new_split_run = pre_run, new_split_run
        new_rows = extract.read_manifest(pre_run, new_split_run)
        return self.combine(old, new_rows, pre_run, new_split_run)

    def embed(self, combined: str, newtest: str | None) -> tuple[str, np.ndarray]:
        """``extract`` the new rows (champion's extractor), ``merge``, ``drift``, evaluate before."""
        st, champ = self.state, self.champ
        self.step("extract")
        new_extract = self.done(
            "extract",
            extract.run(
                self.pre_run,
                split_run_id=self.new_split_run,
                extractor_uri=champ.extractor_uri,
                **self.kw(),
            ),
        )
        new_ids, new_emb = load_embeddings(artifact_path(new_extract, EMBEDDINGS_ARTIFACT))
        st.counts["n_new"] = float(len(new_ids))
        self.step("merge")
        merged = self.merge(new_ids, new_emb, combined)
        self.step("drift")
        drift_run = self.done(
            "drift", drift_stage.run(champ.embeddings_run, new_extract, **self.kw())
        )
        dr = mlflow.get_run(drift_run).data
        st.drift = {
            "verdict": dr.tags.get(drift_stage.TAG_VERDICT, "?"),
            "kind": dr.tags.get(drift_stage.TAG_KIND, "?"),
            **{k: float(dr.metrics[k]) for k in DRIFT_METRICS if k in dr.metrics},
        }
        self.step("evaluate_before")
        if newtest is not None:
            ev = self.try_evaluate("evaluate_before_new", merged, newtest)
            st.before.update(_metrics_of(ev, "new."))
        return merged, new_ids

    def on_wait(
        self,
        merged: str,
        newtest: str | None,
        combined: str,
        commit: Callable[..., None],
        new_clean: list[str],
    ) -> Callable[[], None] | None:
        st = self.state
        if not self.cfg.extend_index_on_wait:
            st.reason += "; new data left pending (extend_index_on_wait: false)"
            return None  # nothing taken in: the next run sees this data again
        self.extend(merged, newtest, combined, "extend (wait)")
        if not st.index_extended:
            return None
        if st.alert == ALERT_NEW_DOMAIN:  # served, but no fine-tuning uses them until released
            return lambda: commit(held=new_clean)
        return lambda: commit(untrained=new_clean)

    def on_improve(
        self,
        merged: str,
        newtest: str | None,
        combined: str,
        commit: Callable[..., None],
        new_clean: list[str],
        pending: list[str],
    ) -> Callable[[], None] | None:
        st, cfg = self.state, self.cfg
        to_train = set(new_clean) | set(pending)
        ft_run = self.finetune(combined, to_train) if cfg.finetune else None
        extended = lambda: commit(untrained=new_clean)  # noqa: E731
        if ft_run is None:
            why = "disabled" if not cfg.finetune else "no new training images"
            st.reason += f"; no fine-tuning ({why})"
            self.extend(merged, newtest, combined, "extend")
            return extended if st.index_extended else None
        ft_fp = mlflow.get_run(ft_run).data.params.get("extractor_fingerprint")
        if ft_fp == self.champ.fingerprint:
            st.reason += "; fine-tuning kept the champion's weights"
            self.extend(merged, newtest, combined, "extend")
            return extended if st.index_extended else None
        self.rebuild(ft_run, combined, newtest)
        if st.promoted:
            return lambda: commit(trained=sorted(to_train))
        if cfg.fallback_extend_on_refusal:
            self.extend(merged, newtest, combined, "extend (fallback)")
            if st.index_extended:
                return extended
        return None  # nothing served the new data: retry with it next run

    # --- data ---------------------------------------------------------------------------------
    def combine(
        self, old: pd.DataFrame, new_rows: pd.DataFrame, pre_run: str, new_split_run: str
    ) -> tuple[str, str | None]:
        """Log the next generation's data (``combine``) and the new data's test set (``newtest``)."""
        result = incremental.combine(old, new_rows)
        combined = result.manifest
        with _nested("combine") as cr:
            mlflow.set_tags(
                {
                    f"{INPUT}data_run_id": self.champ.data_run,
                    f"{INPUT}preprocess_run_id": pre_run,
                    f"{INPUT}split_run_id": new_split_run,
                }
            )
            log_metrics(result.metrics(len(old)))
            log_df(combined, "manifest.parquet")
            log_df(combined[[schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT]], "split.parquet")
        self.done("combine", cr.info.run_id)
        self.new_rows = result.new_rows

        rows, test_items = incremental.new_test_rows(combined, result.new_rows)
        if len(rows) < 2:
            log.info("new data has %d test images: no new-data evaluation", len(rows))
            return cr.info.run_id, None
        with _nested("newtest") as nt:
            mlflow.set_tag(f"{INPUT}split_run_id", cr.info.run_id)
            log_metrics({"n_images": len(rows), "n_items": len(test_items)})
            log_df(rows, "manifest.parquet")
        return cr.info.run_id, self.done("newtest", nt.info.run_id)

    def merge(self, new_ids: np.ndarray, new_emb: np.ndarray, combined_run: str) -> str:
        """The champion extractor's embeddings of the combined data (old ones reused)."""
        champ = self.champ
        old_ids, old_emb = load_embeddings(artifact_path(champ.embeddings_run, EMBEDDINGS_ARTIFACT))
        ids, emb, n_reused = incremental.merge_embeddings(old_ids, old_emb, new_ids, new_emb)
        manifest = read_df(combined_run, "manifest.parquet")
        with _nested("merge", "extract") as mr:
            mlflow.set_tags(
                {
                    "imgsearch.extract.mode": "merge",
                    f"{INPUT}split_run_id": combined_run,
                    f"{INPUT}preprocess_run_id": combined_run,
                    f"{INPUT}reference_run_id": champ.embeddings_run,
                    f"{INPUT}new_extract_run_id": self.state.runs["extract"],
                }
            )
            mlflow.log_param("extractor_fingerprint", champ.fingerprint)
            mlflow.log_param("extractor_uri", champ.extractor_uri)
            with tempfile.TemporaryDirectory() as tmp:
                path = save_embeddings(
                    Path(tmp) / EMBEDDINGS_ARTIFACT,
                    ids,
                    emb,
                    metadata={"extractor_fingerprint": champ.fingerprint},
                )
                mlflow.log_artifact(str(path))
            log_df(
                manifest[manifest[schema.IMAGE_ID].astype(str).isin(set(ids.astype(str)))],
                "manifest.parquet",
            )
            log_metrics({"n": len(ids), "n_reused": n_reused, "n_new": len(new_ids)})
        return self.done("merge", mr.info.run_id)

    def try_evaluate(self, name: str, extract_run: str, split_run: str | None) -> str | None:
        if split_run is None:
            return None
        try:
            with labelled(f"{ROLE} {name}"):
                return self.done(name, evaluate.run(extract_run, split_run, **self.kw()))
        except CatalogError as exc:  # too few images: report, do not fail the job
            log.warning("%s skipped: %s", name, exc)
            return None

    def finetune(self, combined_run: str, to_train: set[str]) -> str | None:
        """``trainset`` (new + replay + val) then ``finetune`` from the champion's extractor."""
        cfg = self.cfg
        combined = read_df(combined_run, "manifest.parquet")
        replay = incremental.ReplayConfig(
            cfg.replay_fraction, cfg.replay_max, cfg.replay_same_items, cfg.seed
        )
        picked = incremental.trainset(combined, to_train, replay)
        if picked is None:
            return None
        rows, counts = picked
        self.state.counts.update({k: float(v) for k, v in counts.items()})
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
        """The fine-tuned extractor: extract everything, build the index, evaluate, gate."""
        st = self.state

        def evaluate_new(ex: str) -> None:
            ev_new = self.try_evaluate("evaluate_new", ex, newtest)
            st.after = {**_metrics_of(st.runs["evaluate"]), **_metrics_of(ev_new, "new.")}

        with labelled(f"{ROLE} fine-tuned"):
            runs = run_chain(
                self.chain(ChainNames(extract="extract_all")),
                data_run_id=combined_run,
                eval_split_run_id=self.champ.frozen_split_run,
                extractor_uri=f"runs:/{ft_run}/extractor",
                texts_run_id=st.runs.get("ingest"),  # a new extractor: text search re-aligned to it
                after_evaluate=evaluate_new,
            )
        assert runs.promote is not None
        self.record_gate(runs.promote, "fine-tuned challenger")
        if st.promoted and self.cfg.refit_attributes:
            self.refit_attributes(runs.extract, combined_run)

    def refit_attributes(self, extract_run: str, combined_run: str) -> None:
        """The attribute heads again, on the extractor just promoted (registered as
        ``imgsearch-attributes@champion``), so the served attributes follow the new champion
        instead of being refused as another extractor's. A failure is reported, never fatal."""
        st = self.state
        self.step("attributes")
        try:
            with labelled(f"{ROLE} fine-tuned"):
                run_id = attributes_step.run_if_configured(extract_run, combined_run, **self.kw())
        except (ImgsearchError, MlflowException, ValueError) as exc:
            log.warning("attribute heads not refitted: %s", exc)
            st.reason += f"; attribute heads not refitted ({type(exc).__name__}: {exc})"
            return
        if run_id is not None:
            self.done("attributes", run_id)
            st.reason += "; attribute heads refitted on the new champion"

    def extend(self, merged_run: str, newtest: str | None, combined_run: str, what: str) -> None:
        """Add the new vectors to a copy of the champion's index; register it; gate it."""
        st = self.state
        names = ChainNames(
            index="index_add",
            evaluate="evaluate_add",
            register="register_index",
            promote="promote_add",
        )

        def after_evaluate(ex: str) -> None:
            after = _metrics_of(st.runs["evaluate_add"])
            if newtest is not None:
                after.update({k: v for k, v in st.before.items() if k.startswith("new.")})
            if not st.after:
                st.after = after

        with labelled(f"{ROLE} add to index"):
            runs = run_chain(
                self.chain(names),
                data_run_id=combined_run,
                eval_split_run_id=self.champ.frozen_split_run,
                extract_run_id=merged_run,
                add_to_index_run_id=self.champ.index_run,
                texts_run_id=st.runs.get("ingest"),
                extractor_run_id=self.champ.extractor_run,  # the merged run has no extractor/
                register_with=lambda ex, ix, ev, al: self.register_index(ix, ev, al),
                after_evaluate=after_evaluate,
            )
        assert runs.promote is not None
        self.record_gate(runs.promote, what, extended=True)

    def register_index(self, index_run: str, evaluate_run: str, align_run: str | None) -> str:
        """A new version of the index only, bound to the champion's extractor version (with the
        text encoder of ``align_run``, aligned to that same extractor, when there is one)."""
        rc, champ = self.register_cfg, self.champ
        with _nested("register_index", "register") as rr:
            mlflow.set_tags(
                {"index_run_id": index_run, "evaluate_run_id": evaluate_run, "mode": "index_only"}
            )
            metrics, tags = evaluation(evaluate_run, rc, index_run_id=index_run)
            # the champion extractor's precision and int8 decision, as a full register carries
            carried, serving_mode = precision_tags(champ.extractor_run)
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
                extra_tags={**tags, **carried},
                serving_mode=serving_mode,
                default_k=rc.default_k,
                name=rc.index_name,
                extractor_name=rc.extractor_name,
                alias=rc.alias,
                client=self.client,
                text_artifacts=(
                    {a: artifact_path(align_run, a) for a in TEXT_ARTIFACTS} if align_run else None
                ),
                description=describe(
                    f"Index of the champion's extractor v{champ.extractor_version} with the new "
                    "images added (improve job)",
                    metrics,
                    evaluate_run,
                ),
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
        return rr.info.run_id

    def record_gate(self, promote_run: str, what: str, extended: bool = False) -> None:
        """What the gate (``promote``) decided, into the job's state."""
        st = self.state
        tags = mlflow.get_run(promote_run).data.tags
        promoted = tags.get("promote.promoted") == "true"
        reason = tags.get("promote.reason", "")
        st.gates.append({"what": what, "promoted": promoted, "reason": reason, "run": promote_run})
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
