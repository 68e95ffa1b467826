"""The continuous-improvement job's flow, step by step (:class:`Job`): the champion, ``newdata``,
``validate`` / ``preprocess`` / ``split`` / ``combine``, ``extract`` / ``merge`` / ``drift``, the
decision, and what follows it, each a nested MLflow run, with the watermark commit returned to the
caller to run last.

:mod:`monitoring.improve` is the entry (``run``, ``python -m monitoring.improve``) and its
docstring describes the flow; :mod:`monitoring.improve_challenger` holds the two ways to a
challenger (fine-tune and rebuild, or add to the served index) and the job's step plumbing
(:class:`~monitoring.improve_challenger.Challenger`, the base of :class:`Job`);
:mod:`monitoring.improve_config` the settings (:class:`ImproveConfig`, ``configs/improve.yaml``)
and the small helpers both use. ``ROLE``, :class:`ImproveConfig` and :class:`Stopped` are
importable from here too.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.data import incremental
from imgsearch.data.watermark import (
    ALERT_NEW_DOMAIN,
    NewData,
    Watermark,
    decide,
    load_watermark,
    save_watermark,
    select_new,
    source_key,
)
from imgsearch.embed.files import load_embeddings, save_embeddings
from monitoring import drift as drift_stage
from monitoring.champion import INPUT, champion_quarantine_ids, find_champion, split_overrides
from monitoring.improve_challenger import Challenger
from monitoring.improve_config import (
    DRIFT_METRICS,
    ROLE,
    ImproveConfig,
    Stopped,
    _metrics_of,
    _nested,
)
from steps import extract, ingest, preprocess, split
from steps import validate as validate_step
from steps.common import (
    EMBEDDINGS_ARTIFACT,
    HEADLINE,
    artifact_path,
    log_df,
    log_metrics,
    read_df,
)

__all__ = ["ROLE", "ImproveConfig", "Intake", "Job", "Stopped"]

log = logging.getLogger(__name__)


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


class Job(Challenger):
    """One run of the job: ``execute`` does the work and returns the watermark commit."""

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
