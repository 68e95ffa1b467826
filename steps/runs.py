"""How a stage's MLflow run is named, tagged and placed: labels, roles and the project's experiment.

A reviewer tells runs apart in the MLflow UI without opening them: inside :func:`labelled`, a
stage run is named ``<stage> · <detail>`` (``evaluate · baseline mobilenet_v2``) and tagged
``imgsearch.role=<role>`` (``baseline``, ``finetuned``, ``improve``); a top-level run goes to the
project's experiment (``imgsearch``), marked so that MLflow 3's UI opens its model-training view.
:func:`steps.common.stage_run` starts every stage run through :func:`start_labelled_run`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

#: how a run is named when it has a label: ``evaluate · baseline mobilenet_v2``
NAME_SEP = " · "
#: run tag telling a run's part in the lifecycle: ``baseline``, ``finetuned`` or ``improve``
ROLE_TAG = "imgsearch.role"
#: the experiment runs land in unless MLflow is told another (``MLFLOW_EXPERIMENT_NAME``/``_ID``)
EXPERIMENT_ENV = "IMGSEARCH_EXPERIMENT"
DEFAULT_EXPERIMENT = "imgsearch"
#: experiment tag MLflow 3's UI reads to pick its view; this value opens the model-training view
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class RunLabel:
    """What the runs started inside :func:`labelled` are: a name detail and a role."""

    detail: str | None = None
    role: str | None = None


_LABEL: contextvars.ContextVar[RunLabel] = contextvars.ContextVar(
    "imgsearch_label",
    default=RunLabel(),  # noqa: B039 (frozen: immutable)
)


@contextlib.contextmanager
def labelled(detail: str | None = None, role: str | None = None) -> Iterator[None]:
    """Name and tag the stage runs started inside: ``extract`` becomes ``extract · <detail>`` and
    is tagged ``imgsearch.role=<role>``. ``None`` keeps the outer label's detail or role."""
    outer = _LABEL.get()
    token = _LABEL.set(
        RunLabel(outer.detail if detail is None else detail, outer.role if role is None else role)
    )
    try:
        yield
    finally:
        _LABEL.reset(token)


def current_label() -> str | None:
    """The name detail of runs started now (``baseline mobilenet_v2``), if any."""
    return _LABEL.get().detail or None


def run_name(stage: str) -> str:
    """The name of a ``stage`` run started now (see :func:`labelled`)."""
    detail = _LABEL.get().detail
    return f"{stage}{NAME_SEP}{detail}" if detail else stage


def start_labelled_run(stage: str, name: str | None = None) -> mlflow.ActiveRun:
    """Start a run for ``stage``, named and tagged by the current label (:func:`labelled`).

    Nested under the active run (in its experiment) when there is one; a top-level run goes to
    the project's experiment (:func:`project_experiment`), marked as model training.
    """
    announce(run_name(name or stage))
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id if parent else project_experiment()
    run = mlflow.start_run(
        run_name=run_name(name or stage), nested=parent is not None, experiment_id=experiment_id
    )
    tags = {"imgsearch.stage": stage}
    role = _LABEL.get().role
    if role:
        tags[ROLE_TAG] = role
    mlflow.set_tags(tags)
    if parent is None:
        _tag_experiment_kind(run.info.experiment_id)
    return run


def project_experiment() -> str | None:
    """The id of the project's experiment (``$IMGSEARCH_EXPERIMENT``, default ``imgsearch``; made
    when missing), so runs do not land in MLflow's unnamed ``Default``.

    ``None`` (MLflow decides) when MLflow was told where to log: ``mlflow run`` (the run it made,
    ``$MLFLOW_RUN_ID``, in its ``--experiment-name``), ``$MLFLOW_EXPERIMENT_NAME`` /
    ``$MLFLOW_EXPERIMENT_ID``, or ``mlflow.set_experiment`` in this process. Sets no global state.
    """
    told = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
    if any(os.environ.get(k) for k in told):
        return None
    if getattr(mlflow.tracking.fluent, "_active_experiment_id", None):
        return None
    name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    except MlflowException:  # made meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _tag_experiment_kind(experiment_id: str) -> None:
    """Mark the experiment as model training (MLflow 3's UI otherwise opens it in its GenAI view);
    a kind someone set already is kept."""
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def announce(message: str) -> None:
    """One line on stdout as a stage starts (the demo says what it is doing, not only when done)."""
    print(f"==> {message}", flush=True)
