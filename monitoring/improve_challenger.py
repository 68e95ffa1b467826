"""The ways to a challenger once the new data is in, and the job's step plumbing
(:class:`Challenger`, the base of :class:`monitoring.improve_job.Job`).

``trainset`` + ``finetune`` warm-started from the champion's extractor; then ``rebuild`` (extract
everything with the fine-tuned extractor, index, evaluate, register, gate; on promotion the
attribute heads are refitted), or ``extend`` (the new vectors added to a copy of the champion's
index, registered as a new index version of the champion's extractor version, gated). Each is a
nested MLflow run; what the gate decided goes into the job's state (``record_gate``).

:mod:`monitoring.improve` is the entry and its docstring describes the flow;
:mod:`monitoring.improve_job` is the flow up to the decision and what follows it (``on_wait``,
``on_improve``, which call in here); :mod:`monitoring.improve_config` holds the settings and the
small helpers both use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict
from imgsearch.data import incremental
from imgsearch.errors import CatalogError, ImgsearchError
from imgsearch.search.ranking import RankingConfig
from monitoring.champion import INPUT, Champion
from monitoring.daemon import stop_requested
from monitoring.improve_config import (
    ROLE,
    ImproveConfig,
    Stopped,
    _metrics_of,
    _nested,
    _pause_point,
)
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
from steps import evaluate, finetune
from steps.chain import Chain, ChainNames, run_chain
from steps.common import artifact_path, log_df, log_metrics, read_df
from steps.register import precision_tags
from steps.runs import labelled

log = logging.getLogger(__name__)


class Challenger:
    """The job's state and step plumbing, and the ways to a challenger; :class:`Job
    <monitoring.improve_job.Job>` adds the flow that gets the new data in and decides."""

    champ: Champion  # set by Job.load_champion, the job's first step

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

    # --- evaluate, fine-tune ------------------------------------------------------------------
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
