"""Every ``MLproject`` entry point runs through ``mlflow run`` with its defaults (issue 17 point 4).

``mlflow run`` logs each ``-P`` value (``''`` for "keep the config") as a param of the run the step
then logs its own settings in, under the same names: the step must not collide with them. The
steps run on a tiny synthetic folder catalog (ci profile, a private config dir and tracking store).
Each ``mlflow run`` costs ~15 s (a CLI and a torch import), so the default run keeps the entry
points that failed (ingest, validate, promote) and one documented parameter; the rest are ``slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import make_folder_catalog

ROOT = Path(__file__).resolve().parent.parent
PROFILE = """
ingest:
  source: folder
  path: {catalog}
extract:
  backbone: mobilenet_v2
  weights: none
preprocess:
  size: 32
eda:
  thumbnails: 0
evaluate:
  plots: false
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for ``mlflow run``: configs with the ci profile aimed at a tiny catalog."""
    root = tmp_path_factory.mktemp("entry_points")
    catalog = make_folder_catalog(root / "catalog", n_items=6, per_item=3)
    configs = root / "configs"
    shutil.copytree(ROOT / "configs", configs)
    ci = configs / "profiles" / "ci.yaml"
    ci.write_text(ci.read_text() + PROFILE.format(catalog=catalog))
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "IMGSEARCH_CONFIG_DIR": str(configs),
            "IMGSEARCH_PROFILE": "ci",
            "IMGSEARCH_HOME": str(root / "home"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.pop("MLFLOW_RUN_ID", None)
    return env


def mlflow_run(env: dict[str, str], entry: str, **params: str) -> str:
    """``mlflow run . -e entry -P k=v ...``; the run id, after asserting the run succeeded."""
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, f"mlflow run -e {entry} failed:\n{out.stderr[-4000:]}"
    found = re.findall(r"Run \(ID '([0-9a-f]+)'\) succeeded", out.stderr)
    assert found, out.stderr[-2000:]
    return found[-1]


def _client(env: dict[str, str]) -> MlflowClient:
    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def test_ingest_validate_promote_run_with_defaults_and_a_parameter(
    project: dict[str, str],
) -> None:
    client = _client(project)
    ingest = mlflow_run(project, "ingest")
    run = client.get_run(ingest)
    assert run.data.metrics["n_images"] == 19  # 6 items x 3 images + the broken file
    # the user's -P value and the effective setting are both on record
    assert run.data.params["source"] == "''"
    assert run.data.params["cfg.source"] == "folder"

    # a documented parameter reaches the stage
    validate = mlflow_run(project, "validate", ingest_run_id=ingest, min_size="16")
    run = client.get_run(validate)
    assert run.data.metrics["n_clean"] == 18
    assert run.data.params["min_size"] == "16"

    promote = mlflow_run(project, "promote")
    assert client.get_run(promote).data.tags["promote.promoted"] == "false"


def test_main_run_records_the_settings_in_effect_not_empty_placeholders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mlflow run . -P backbone=... -P finetune=false`` of ``main``: the run MLflow makes holds
    the given values, and ``steps.main`` adds the others with the values in effect, each under
    its own name (no ``''`` placeholder, no ``cfg.`` twin). MLflow's own code makes the run and
    the command; the pipeline is stopped once the settings are logged."""
    import shlex

    import mlflow
    from mlflow.projects import _project_spec
    from mlflow.projects.utils import _create_run

    import steps.main as main_step

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMGSEARCH_PROFILE", raising=False)
    mlflow.set_tracking_uri(uri)
    given = {"backbone": "mobilenet_v2", "finetune": "false"}
    try:
        experiment = mlflow.create_experiment("entry-points")
        run = _create_run(str(ROOT), experiment, str(ROOT), None, "main", given)
        command = (
            _project_spec.load_project(str(ROOT))
            .get_entry_point("main")
            .compute_command(given, str(tmp_path))
        )
        program, argv = shlex.split(command)[:3], shlex.split(command)[3:]
        assert program == ["python", "-m", "steps.main"]

        class Stop(Exception):
            pass

        def stop(**_: object) -> str:
            raise Stop

        monkeypatch.setattr(main_step.ingest, "run", stop)
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        with pytest.raises(Stop):
            main_step.cli(main_step.run, None, main_step.OPTIONS, argv, adjust=main_step._switches)
        params = MlflowClient().get_run(run.info.run_id).data.params
    finally:
        mlflow.set_tracking_uri(None)
    assert params["backbone"] == "mobilenet_v2" and params["finetune"] == "false"
    assert params["profile"] == "default" and params["promote"] == "true"
    assert params["weights"] and params["factory"] and params["limit"] == "all"
    assert not [k for k, v in params.items() if v in ("''", "")], params
    assert not [k for k in params if k.startswith("cfg.")], params


@pytest.mark.slow
def test_every_other_entry_point_runs(project: dict[str, str]) -> None:
    """The whole chain entry point by entry point, then rollback, drift and improve."""
    ingest = mlflow_run(project, "ingest", source="folder")
    validate = mlflow_run(project, "validate", ingest_run_id=ingest)
    pre = mlflow_run(project, "preprocess", validate_run_id=validate)
    mlflow_run(project, "eda", validate_run_id=validate, preprocess_run_id=pre)
    split = mlflow_run(project, "split", preprocess_run_id=pre)
    ex = mlflow_run(project, "extract", preprocess_run_id=pre, split_run_id=split)
    ix = mlflow_run(project, "index", extract_run_id=ex, split_run_id=split)
    ev = mlflow_run(project, "evaluate", extract_run_id=ex, split_run_id=split)
    mlflow_run(project, "categorize", extract_run_id=ex, k="4", n_categories="2")
    mlflow_run(project, "register", extract_run_id=ex, index_run_id=ix, evaluate_run_id=ev)
    mlflow_run(project, "promote")
    mlflow_run(project, "finetune", split_run_id=split, preprocess_run_id=pre, epochs="1")
    mlflow_run(project, "index", extract_run_id=ex, split_run_id=split, add_to_index_run_id=ix)
    mlflow_run(project, "drift", reference_run_id=ex, current_run_id=ex)
    mlflow_run(project, "improve")
    mlflow_run(project, "rollback")
    mlflow_run(project, "main", finetune="false")


def test_improve_set_overrides_an_improve_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--set improve.finetune=false`` and the job's own ``improve.finetune=False`` both log."""
    import mlflow

    from monitoring import improve

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        assert improve.main(["--profile", "ci", "--set", "improve.finetune=false"]) == 0
        (run,) = mlflow.search_runs(output_format="list", search_all_experiments=True)
    finally:
        mlflow.set_tracking_uri(None)
    assert run.data.tags["imgsearch.improve.decision"] == "skip"  # no champion yet
    assert run.data.params["improve.finetune"] == "false"
    assert run.data.params["cfg.improve.finetune"] == "False"
