"""Improve runs left RUNNING by a killed job are marked ``KILLED`` when the next job starts.

A SIGKILLed job cannot end its MLflow runs: they stay RUNNING forever and ``daemon status`` shows
``decision=?``. The daemon (``serve``) and ``python -m monitoring.improve`` call
:func:`mark_orphans` right after taking the job lock (:func:`monitoring.lock.job_lock`): holding it
proves that no other improve job on this tracking store is live, so every RUNNING run tagged
``imgsearch.stage=improve``, and every RUNNING run nested under one (at any depth), is an orphan.
Other RUNNING runs in the same experiment (a ``steps.main`` run started by hand, say) are left
alone: the lock says nothing about them.

Each orphan is terminated as ``KILLED`` with tags ``imgsearch.improve.decision=killed`` and
``imgsearch.improve.killed_reason=orphaned: found RUNNING at <context> <iso time>``; an orphaned
parent without a reason also gets it as ``imgsearch.improve.reason`` (what ``status`` prints).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus

log = logging.getLogger(__name__)

IMPROVE_STAGE = "improve"
STAGE_TAG = "imgsearch.stage"
PARENT_TAG = "mlflow.parentRunId"
DECISION_TAG = "imgsearch.improve.decision"
REASON_TAG = "imgsearch.improve.reason"
KILLED_REASON_TAG = "imgsearch.improve.killed_reason"
KILLED = "killed"
_RUNNING = f"attributes.status = '{RunStatus.to_string(RunStatus.RUNNING)}'"


def _pages(fetch: Callable[[str | None], Any]) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return


def _running(client: MlflowClient, experiment_ids: list[str], extra: str = "") -> list[Any]:
    if not experiment_ids:
        return []
    where = f"{_RUNNING} and {extra}" if extra else _RUNNING
    return list(
        _pages(
            lambda token: client.search_runs(
                experiment_ids, where, max_results=1000, page_token=token
            )
        )
    )


def find_orphans(client: MlflowClient, stage: str = IMPROVE_STAGE) -> list[Any]:
    """RUNNING runs tagged ``imgsearch.stage=<stage>`` and the RUNNING runs nested under them."""
    experiments = [
        e.experiment_id
        for e in _pages(lambda token: client.search_experiments(max_results=1000, page_token=token))
    ]
    roots = []
    for start in range(0, len(experiments), 100):  # search_runs takes a bounded list of ids
        roots += _running(
            client, experiments[start : start + 100], f"tags.`{STAGE_TAG}` = '{stage}'"
        )
    if not roots:
        return []
    found = {r.info.run_id: r for r in roots}
    candidates = _running(client, sorted({r.info.experiment_id for r in roots}))
    grew = True
    while grew:  # children of orphans, then their children, ...
        grew = False
        for run in candidates:
            rid = run.info.run_id
            if rid not in found and run.data.tags.get(PARENT_TAG) in found:
                found[rid] = run
                grew = True
    return list(found.values())


def mark_orphans(
    client: MlflowClient | None = None,
    context: str = "job start",
    stage: str = IMPROVE_STAGE,
) -> list[str]:
    """Terminate the orphaned runs as ``KILLED`` with the ``killed`` decision; returns their ids.

    Call only while holding the job lock (see the module docstring).
    """
    client = client or MlflowClient()
    orphans = find_orphans(client, stage)
    if not orphans:
        return []
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reason = f"orphaned: found RUNNING at {context} {when}"
    end = int(time.time() * 1000)
    for run in _deepest_first(orphans):
        rid, tags = run.info.run_id, run.data.tags
        client.set_tag(rid, DECISION_TAG, KILLED)
        client.set_tag(rid, KILLED_REASON_TAG, reason)
        if tags.get(STAGE_TAG) == stage and not tags.get(REASON_TAG):
            client.set_tag(rid, REASON_TAG, reason)
        client.set_terminated(rid, status=RunStatus.to_string(RunStatus.KILLED), end_time=end)
    ids = [r.info.run_id for r in orphans]
    log.warning("marked %d orphaned %s run(s) KILLED: %s", len(ids), stage, ", ".join(ids))
    return ids


def _deepest_first(runs: Iterable[Any]) -> list[Any]:
    """Children before their parents, so a parent never ends while a child still runs."""
    by_id = {r.info.run_id: r for r in runs}

    def depth(run: Any) -> int:
        d, parent = 0, run.data.tags.get(PARENT_TAG)
        while parent in by_id and d < len(by_id):
            d, parent = d + 1, by_id[parent].data.tags.get(PARENT_TAG)
        return d

    return sorted(by_id.values(), key=depth, reverse=True)
