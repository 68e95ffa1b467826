"""Which evaluation belongs to which registered runs: the run-matching rules, and the metrics
and tags an evaluate run contributes to a version (see :mod:`registry.register`)."""

from __future__ import annotations

import logging
import tempfile
from typing import TYPE_CHECKING

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch import schema
from registry.tags import (
    INPUT_EXTRACT_RUN,
    INPUT_SPLIT_RUN,
    TAG_EVAL_SPLIT,
    TAG_EVAL_SPLIT_RUN,
    TAG_EVALUATE_RUN,
    TAG_TEST_SPLIT,
    EvaluationMismatchError,
    select_metrics,
    test_split_hash,
)

if TYPE_CHECKING:
    from registry.register import RegisterConfig

log = logging.getLogger(__name__)


def _run_tag(client: MlflowClient, run_id: str, key: str, what: str) -> str:
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise EvaluationMismatchError(f"{what} run {run_id} not found: {exc.message}") from exc
    value = run.data.tags.get(key)
    if not value:
        raise EvaluationMismatchError(
            f"{what} run {run_id} records no {key!r} tag: cannot tell what it measured or holds"
        )
    return str(value)


def check_evaluation(
    client: MlflowClient,
    evaluate_run_id: str,
    *,
    extract_run_id: str | None = None,
    index_run_id: str | None = None,
) -> str:
    """The extract run ``evaluate_run_id`` measured, checked against the runs being registered.

    The evaluate step records its input as tag ``imgsearch.input.extract_run_id``; so does the
    index step. Raises :class:`EvaluationMismatchError` unless the evaluation measured exactly
    ``extract_run_id`` (when given) and the embeddings ``index_run_id`` was built from (when
    given).
    """
    if extract_run_id is None and index_run_id is None:
        raise TypeError("check_evaluation needs extract_run_id and/or index_run_id")
    measured = _run_tag(client, evaluate_run_id, INPUT_EXTRACT_RUN, "evaluate")
    if extract_run_id is not None and measured != extract_run_id:
        raise EvaluationMismatchError(
            f"evaluate run {evaluate_run_id} measured extract run {measured}, not {extract_run_id}: "
            "an evaluation is accepted only for the runs it measured"
        )
    if index_run_id is not None:
        built_from = _run_tag(client, index_run_id, INPUT_EXTRACT_RUN, "index")
        if built_from != measured:
            raise EvaluationMismatchError(
                f"index run {index_run_id} holds the vectors of extract run {built_from}, but "
                f"evaluate run {evaluate_run_id} measured extract run {measured}"
            )
    return measured


def evaluation(
    evaluate_run_id: str,
    cfg: RegisterConfig,
    *,
    extract_run_id: str | None = None,
    index_run_id: str | None = None,
    client: MlflowClient | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """``(metrics, tags)`` to record on the versions made from ``extract_run_id`` /
    ``index_run_id``, after :func:`check_evaluation` (give at least one of them).

    ``metrics``: the run's metrics under ``cfg.metric_prefixes`` (bare names). ``tags``:
    ``evaluate_run_id``, ``eval_split`` / ``eval_split_run_id`` (which split of which split run
    it measured) and ``test_split_hash`` (of ``cfg.per_query_artifact``'s image ids) when known.
    """
    client = client or MlflowClient()
    check_evaluation(
        client, evaluate_run_id, extract_run_id=extract_run_id, index_run_id=index_run_id
    )
    run = client.get_run(evaluate_run_id)
    metrics = select_metrics(run.data.metrics, cfg.metric_prefixes, cfg.metrics or None)
    tags = {TAG_EVALUATE_RUN: evaluate_run_id}
    # an `mlflow run -P split=''` leaves "" under "split" and the value used under "cfg.split"
    params = run.data.params
    split = params.get("evaluate.split") or params.get("cfg.split") or params.get("split")
    if split:
        tags[TAG_EVAL_SPLIT] = split
        if split != "test":
            log.warning("evaluate run %s measured split %r, not 'test'", evaluate_run_id, split)
    split_run = run.data.tags.get(INPUT_SPLIT_RUN)
    if split_run:
        tags[TAG_EVAL_SPLIT_RUN] = split_run
    query_ids = _per_query_ids(client, evaluate_run_id, cfg.per_query_artifact)
    if query_ids is not None:
        tags[TAG_TEST_SPLIT] = test_split_hash(query_ids)
    return metrics, tags


def _per_query_ids(client: MlflowClient, run_id: str, artifact: str) -> list[str] | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, artifact, tmp)
            per_query = pd.read_parquet(path)
    except (MlflowException, OSError):
        log.info("no %s in evaluate run %s: test split not recorded", artifact, run_id)
        return None
    if schema.IMAGE_ID not in per_query.columns:
        return None
    return per_query[schema.IMAGE_ID].astype(str).tolist()
