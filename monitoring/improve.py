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
   drift of kind ``shift`` (the new images fall near things the champion knows: a new style, a new
   mix) or when new + pending (served, not yet trained on) images reach ``min_new_images``;
   ``wait`` otherwise. Drift of kind ``novel`` (a new domain: more than ``drift.novel_share_max``
   of the new images are far from everything in the champion's data) follows ``on_novel``:
   ``review`` (default) is ``wait``, with the reason saying so and the tag
   ``imgsearch.improve.alert=new_domain``: the new images are added to the served index and listed
   as ``held`` in the watermark; no fine-tuning takes them until ``release_held`` (a person's
   call); ``improve`` treats it like any drift.
6. ``improve``: ``trainset`` = new train images + the old images of their items + a seeded random
   replay of old train images + every val image; ``finetune`` warm-started from the champion's
   extractor; when that changed the extractor: ``extract`` everything again, ``index`` (rebuilt),
   ``evaluate`` on the frozen test split (what the gate compares: same split hash as the
   champion's) and on ``newtest``, ``register`` the challenger pair, ``promote`` (the gate).
   When the extractor did not change (or on ``wait``, or after a refused fine-tuned challenger):
   ``index`` adds the new vectors to a copy of the champion's index, registered as a new index
   version of the same extractor version, evaluated and gated the same way.
7. tags ``imgsearch.improve.decision`` / ``.reason`` / ``.promoted`` / ``.drift_kind`` (and
   ``.alert`` when there is one), metrics ``n_new``, ``n_quarantined``, ``drift_score``,
   ``drift_detected``, ``drift_effect``, ``knn_novel_share``, ``knn_distance_ratio``, ``before.*`` / ``after.*``, and
   ``summary.json`` + ``summary.md``; then, and only then, the watermark advances (saved
   atomically under ``$IMGSEARCH_HOME/watermarks``; a copy is logged as ``watermark.json``).
   Before the summary, the online A/B's report (:mod:`monitoring.ab_job`: ``ab_report.json``,
   ``ab_*`` metrics, tag ``ab.verdict``) when A/B impressions exist; after the watermark, the
   reranker's retraining (:mod:`monitoring.reranker_job`). Neither ever fails the job.

A job killed at any point leaves the champion aliases (what is served) and the watermark as they
were: the only writes that matter are the gate's alias moves (all-or-nothing) and the watermark
(``os.replace``), both at the end. The next run redoes the work. A store that fails during the
gate raises :class:`registry.promote.RegistryUnavailableError` (the CLI exits 2): nothing changed.
The daemon's SIGTERM is honoured between steps (:func:`monitoring.daemon.stop_requested`).
Run by hand, :func:`main` first takes the job lock the daemon holds (:func:`monitoring.lock.job_lock`,
keyed on the resolved MLflow tracking store; refused: exit status 3) and marks the improve runs a
killed job left RUNNING as ``KILLED`` (:mod:`monitoring.orphans`); :func:`run` takes no lock, as the
daemon calls it in-process under its own.

Test hook: ``IMGSEARCH_IMPROVE_PAUSE_AT=<step>`` makes the job touch ``$IMGSEARCH_IMPROVE_PAUSE_FILE``
(when set) and sleep 600 s before that step, so a test can SIGKILL it at a known point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict, load_config
from imgsearch.data.watermark import decide
from imgsearch.errors import ImgsearchError
from monitoring import ab_job, reranker_job
from monitoring.daemon import EXIT_LOCKED, IMPROVE_STAGE
from monitoring.improve_job import ROLE, ImproveConfig, Job, Stopped
from monitoring.improve_summary import JobState, record
from monitoring.lock import JobAlreadyRunning, job_lock
from monitoring.orphans import mark_orphans
from registry.promote import PromoteConfig
from registry.register import RegisterConfig
from steps.artifacts import clear_downloads
from steps.common import PROFILE_ENV, Option, log_settings, parse_cli, setup_logging
from steps.runs import labelled, start_labelled_run

log = logging.getLogger(__name__)

STAGE = IMPROVE_STAGE
__all__ = ["ImproveConfig", "decide", "run", "main"]


# --- the job -------------------------------------------------------------------------------------


def run(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    client: MlflowClient | None = None,
) -> str:
    """Run the job once (see the module docstring); returns the parent run id. What the job
    downloaded from a remote artifact store is removed when it ends (:mod:`steps.artifacts`)."""
    try:
        return _run(profile, overrides, client=client)
    finally:
        clear_downloads()


def _run(
    profile: str | None, overrides: dict[str, Any] | None, *, client: MlflowClient | None
) -> str:
    profile = profile or os.environ.get(PROFILE_ENV) or None
    user = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
    all_cfg = load_config(profile, user)
    cfg = from_dict(ImproveConfig, all_cfg.get(STAGE))
    promote_cfg = from_dict(PromoteConfig, all_cfg.get("promote"))
    register_cfg = from_dict(RegisterConfig, all_cfg.get("register"))
    client = client or MlflowClient()
    state = JobState()
    with labelled(role=ROLE):
        started = start_labelled_run(STAGE)
    with started as parent, labelled(ROLE, role=ROLE):
        if profile:
            mlflow.set_tag("imgsearch.profile", profile)
        # what the user asked for first, then the effective settings: an effective value whose
        # name the user's text already took (``improve.finetune``: ``false`` vs ``False``) is
        # logged as ``cfg.improve.finetune`` instead of being refused by MLflow
        log_settings({k: str(v)[:500] for k, v in user.items()})
        log_settings({f"improve.{k}": str(v)[:500] for k, v in asdict(cfg).items()})
        job = Job(cfg, promote_cfg, register_cfg, profile, user, client, state)
        commit: Callable[[], None] | None = None
        try:
            commit = job.execute()
        except Stopped as exc:
            state.decision, state.reason = "stopped", str(exc)
        except BaseException as exc:
            state.decision = "failed"
            state.reason = f"{type(exc).__name__}: {exc}"
            record(state, failed=True)
            raise
        if state.decision != "stopped":  # the online A/B's report (never fails the job)
            ab = ab_job.report(profile, user)
            if ab.startswith("failed"):
                state.reason += f"; A/B report {ab}"
        record(state)
        if commit is not None:
            commit()  # the watermark moves only now: the decision is logged
        if state.decision != "stopped":  # enough new votes: retrain the reranker (never fails)
            reranker_job.maybe_retrain(profile, user, client)
        log.info("improve: %s (%s)", state.decision, state.reason)
        return parent.info.run_id


OPTIONS = (
    Option("--limit", "demo catalog: number of emoji (demo.limit)", key="demo.limit"),
    Option("--min-new-images", "improve.min_new_images", key="improve.min_new_images"),
    Option(
        "--set",
        "any config override KEY=VALUE, e.g. --set ingest.path=/data/photos (repeatable)",
        repeat=True,
    ),
)


def main(argv: list[str] | None = None) -> int:
    kwargs, overrides, profile = parse_cli(__doc__, OPTIONS, argv)
    for item in kwargs["set"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--set wants KEY=VALUE, not {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value
    setup_logging()
    with contextlib.ExitStack() as held:
        try:  # the daemon's job lock (monitoring.lock): one improve job per tracking store
            held.enter_context(job_lock(holder="monitoring.improve by hand"))
        except JobAlreadyRunning as exc:
            print(f"refusing to start: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        try:
            mark_orphans(context="improve start")
            run_id = run(profile, overrides)
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
