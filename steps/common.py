"""The one place where steps meet MLflow: start a stage run, log its config, hand artifacts on.

Every step module exposes ``run(**params) -> run_id`` (called by ``steps.main`` in-process, nested
under the parent run) and a ``main()`` CLI (called by the MLproject entry point) made by :func:`cli`
from typed :class:`Option` s. Steps hand each other artifacts by run id: :func:`read_df` and
:func:`artifact_path` download from ``runs:/<id>/...``.

Settings and ``mlflow run``: an entry point's ``-P`` values are logged by ``mlflow run`` as params
of the very run the step then logs its own settings in, under the same names (``url``, ``min_size``)
and often with another text (``''`` for "keep the config", ``true`` for ``True``). MLflow refuses to
change a param, so :func:`log_settings` logs an effective value that differs from what is already
there under ``cfg.<key>`` instead; :func:`setting` reads a setting back either way.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from imgsearch.config import flatten, load_config
from steps.artifacts import artifact_path
from steps.runs import start_labelled_run

log = logging.getLogger(__name__)

PROFILE_ENV = "IMGSEARCH_PROFILE"
#: the artifact every extract (and merge) run writes: ``imgsearch.embed.extract.save_embeddings``
EMBEDDINGS_ARTIFACT = "embeddings.parquet"
#: the headline retrieval metrics (of an evaluate run), most telling first
HEADLINE = ("map_at_r", "map", "hit_at_1", "hit_at_10", "recall_at_10", "precision_at_1")
#: prefix of an effective setting whose plain name is already taken by an ``mlflow run -P`` value
SETTING_PREFIX = "cfg."
#: keys a library's metrics dict reports that are settings, not measurements: logged as params
SETTING_KEYS = frozenset(
    {
        "batch_size",
        "num_workers",
        "threads",
        "channels_last",
        "bf16_used",
        "compile_used",
        "dim",
        "nprobe",
        "ef_search",
        "k",
        "seed",
    }
)


#: MLflow draws a progress bar for every artifact download (dozens of tiny ones per stage)
ARTIFACT_BARS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def setup_logging() -> None:
    """Log lines for a command-line run; MLflow's artifact download bars off unless asked for."""
    os.environ.setdefault(ARTIFACT_BARS_ENV, "false")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@contextlib.contextmanager
def stage_run(
    stage: str, overrides: Mapping[str, Any] | None = None, profile: str | None = None
) -> Iterator[tuple[mlflow.ActiveRun, dict[str, Any]]]:
    """Start the MLflow run of ``stage`` (nested when a parent is active) and log its config.

    ``overrides`` are dotted keys (``{"extract.batch_size": 32}``); empty values keep the config.
    Yields ``(run, cfg)`` where ``cfg`` is the whole effective config.
    """
    profile = profile or os.environ.get(PROFILE_ENV) or None
    cfg = load_config(profile, overrides)
    with start_labelled_run(stage) as run:
        if profile:
            mlflow.set_tag("imgsearch.profile", profile)
        section = cfg.get(stage, {})
        if isinstance(section, Mapping):
            log_settings({k: _mask(k, v) for k, v in flatten(section).items()})
        masked = {
            s: ({k: _mask(k, v) for k, v in sec.items()} if isinstance(sec, Mapping) else sec)
            for s, sec in cfg.items()
        }
        mlflow.log_text(yaml.safe_dump(masked, sort_keys=True), "config.yaml")
        yield run, cfg


def log_settings(params: Mapping[str, Any]) -> None:
    """Log ``params`` on the active run without ever changing a param already logged there.

    A key already logged with the same text is skipped; one already logged with another text (an
    ``mlflow run -P`` value, such as ``''`` for "keep the config") gets the effective value under
    ``cfg.<key>``, so both the user's input and what the stage used are on record.
    """
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("log_settings needs an active MLflow run")
    logged = mlflow.get_run(active.info.run_id).data.params
    out: dict[str, str] = {}
    for key, value in params.items():
        text = _param(value)
        if key in logged and logged[key] != text:
            key = f"{SETTING_PREFIX}{key}"
        if logged.get(key) != text:
            out[key] = text
    if out:
        mlflow.log_params(out)


def setting(params: Mapping[str, str], key: str) -> str | None:
    """The effective setting ``key`` among a run's params (see :func:`log_settings`)."""
    return params.get(f"{SETTING_PREFIX}{key}", params.get(key))


def _mask(key: str, value: Any) -> Any:
    """Hide a password in a database URL before it is logged (``postgresql://u:***@host/db``)."""
    if key.endswith("url") and isinstance(value, str) and "@" in value:
        try:
            from sqlalchemy.engine import make_url

            return make_url(value).render_as_string(hide_password=True)
        except Exception:  # not a SQLAlchemy URL: log it without its credentials part
            return value.split("@", 1)[-1]
    return value


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics``; metric names are sanitised for MLflow.

    Settings a library reports beside its measurements (:data:`SETTING_KEYS`, and text values
    such as ``precision_used``) are logged as params instead (not per step).
    """
    clean: dict[str, float] = {}
    settings: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in SETTING_KEYS or isinstance(value, str):
            # a count reported as a float (64.0) is logged as the config writes it (64)
            whole = isinstance(value, float) and value.is_integer()
            settings[key] = int(value) if whole else value
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            clean[_metric_name(key)] = number
    if clean:
        mlflow.log_metrics(clean, step=step)
    if settings and step is None:
        log_settings({_metric_name(k): v for k, v in settings.items()})


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_df(df: pd.DataFrame, name: str, view: bool = False) -> None:
    """Log ``df`` as Parquet artifact ``name`` (for example ``manifest.parquet``).

    ``view``: a table a person reads (quarantine, near duplicates, per-query results): also logged
    as CSV beside it (``quarantine.csv``), which the MLflow UI's artifact viewer shows.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        df.to_parquet(path, index=False)
        mlflow.log_artifact(str(path))
        if view:
            csv = path.with_suffix(".csv")
            df.to_csv(csv, index=False, float_format="%.4g")
            mlflow.log_artifact(str(csv))


def read_df(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_parquet(artifact_path(run_id, name))


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="", help="config profile (configs/profiles/NAME.yaml)")
    return parser


@dataclass(frozen=True)
class Option:
    """One CLI option of a step.

    With ``key`` (a dotted config key such as ``validate.min_size``) the value is a config
    override, and an empty value keeps the config. Without it the value is passed to ``run`` as
    the keyword named after the flag (``--split-run-id`` -> ``split_run_id``); an empty string
    becomes ``None`` unless ``empty_is_none`` is false.
    """

    flag: str
    help: str = ""
    key: str | None = None
    required: bool = False
    default: Any = ""
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    flag_only: bool = False  # a store_true switch
    repeat: bool = False  # may be given several times: the value is the list of them
    empty_is_none: bool = True

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ActionsContainer) -> None:
        if self.flag_only:
            parser.add_argument(self.flag, action="store_true", help=self.help)
            return
        if self.repeat:
            parser.add_argument(self.flag, action="append", default=[], help=self.help)
            return
        kwargs: dict[str, Any] = {"help": self.help, "default": self.default}
        if self.required:
            kwargs["required"] = True
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        parser.add_argument(self.flag, **kwargs)


def parse_cli(
    doc: str | None,
    options: Sequence[Option],
    argv: Sequence[str] | None = None,
    one_of: Sequence[Option] = (),
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Parse ``argv`` into ``(run keywords, dotted overrides, profile)``.

    ``one_of``: options of which exactly one must be given (a required mutually exclusive group).
    """
    parser = base_parser(doc)
    for option in options:
        option.add_to(parser)
    if one_of:
        group = parser.add_mutually_exclusive_group(required=True)
        for option in one_of:
            option.add_to(group)
    args = vars(parser.parse_args(argv))
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for option in (*options, *one_of):
        value = args[option.dest]
        if option.key is not None:
            overrides[option.key] = value
        elif option.empty_is_none and value == "":
            kwargs[option.dest] = None
        else:
            kwargs[option.dest] = value
    return kwargs, overrides, args["profile"] or None


def cli(
    run: Callable[..., str],
    doc: str | None,
    options: Sequence[Option],
    argv: Sequence[str] | None = None,
    one_of: Sequence[Option] = (),
    adjust: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> str:
    """A step's ``main()``: parse the options, run the step, print its run id.

    ``adjust(kwargs, overrides)`` may change what ``run`` gets (a setting derived from another).
    ``overrides`` is passed only to a ``run`` that takes it.
    """
    kwargs, overrides, profile = parse_cli(doc, options, argv, one_of)
    if adjust is not None:
        adjust(kwargs, overrides)
    setup_logging()
    if "overrides" in inspect.signature(run).parameters:
        kwargs["overrides"] = overrides
    run_id = run(**kwargs, profile=profile)
    print(run_id)
    return run_id
