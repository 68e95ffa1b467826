"""What a reviewer sees: run names and roles, the project's experiment, settings logged as params,
rounded headline metric tags the gate still checks, the order of the before/after table, and a
drift command whose ``--help`` imports nothing heavy. (The whole pipeline's names, roles and
descriptions are checked in ``tests/test_pipeline.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from registry.tags import metric_tags, recorded_matches
from steps import common, runs
from steps.summary import effective_params, ordered_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_runs_are_named_and_tagged_by_their_label(mlflow_store: str) -> None:
    with runs.labelled("baseline mobilenet_v2", role="baseline"):
        with common.stage_run("evaluate") as (run, _cfg):
            pass
        with runs.labelled("finetuned mobilenet_v2", role="finetuned"):
            with common.stage_run("extract") as (inner, _cfg):
                pass
        with runs.labelled(None, role=None), common.stage_run("index") as (kept, _cfg):
            pass
    with common.stage_run("ingest") as (plain, _cfg):
        pass
    client = MlflowClient()
    got = {
        r.info.run_name: r.data.tags.get(runs.ROLE_TAG)
        for r in (client.get_run(x.info.run_id) for x in (run, inner, kept, plain))
    }
    assert got == {
        "evaluate · baseline mobilenet_v2": "baseline",
        "extract · finetuned mobilenet_v2": "finetuned",
        "index · baseline mobilenet_v2": "baseline",
        "ingest": None,
    }


def test_top_level_runs_go_to_the_project_experiment_in_the_training_view(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(runs.EXPERIMENT_ENV, raising=False)
    with common.stage_run("ingest") as (run, _cfg):
        with common.stage_run("validate") as (child, _cfg):
            pass
    client = MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "imgsearch"
    assert experiment.tags[runs.EXPERIMENT_KIND_TAG] == runs.EXPERIMENT_KIND
    assert child.info.experiment_id == run.info.experiment_id  # nested runs follow their parent

    monkeypatch.setenv(runs.EXPERIMENT_ENV, "mine")
    with common.stage_run("ingest") as (mine, _cfg):
        pass
    assert client.get_experiment(mine.info.experiment_id).name == "mine"

    # told by MLflow's own variable (as `mlflow run --experiment-name` and the tests do): obeyed
    other = client.create_experiment("chosen-elsewhere")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other)
    with common.stage_run("ingest") as (chosen, _cfg):
        pass
    assert chosen.info.experiment_id == other
    # a kind someone set is kept; an experiment without one is marked as model training
    assert client.get_experiment(other).tags[runs.EXPERIMENT_KIND_TAG] == runs.EXPERIMENT_KIND


def test_settings_reported_with_metrics_are_logged_as_params(mlflow_store: str) -> None:
    with mlflow.start_run() as run:
        common.log_metrics(
            {"images_per_s": 12.5, "batch_size": 64.0, "bf16_used": 0.0, "precision_used": "fp32"}
        )
    data = MlflowClient().get_run(run.info.run_id).data
    assert set(data.metrics) == {"images_per_s"}
    assert data.params == {"batch_size": "64", "bf16_used": "0", "precision_used": "fp32"}


def test_metric_tags_are_rounded_and_still_match_the_measured_figure() -> None:
    measured = 0.7351234567
    tags = metric_tags({"map_at_r": measured, "n": float("nan")})
    assert tags == {"metric.map_at_r": "0.7351"}
    assert recorded_matches(float(tags["metric.map_at_r"]), measured)
    assert recorded_matches(measured, measured)  # versions registered at full precision
    assert not recorded_matches(0.7352, measured)  # a forged tag is still refused
    assert not recorded_matches(0.99, measured)


def test_before_after_leads_with_the_headline_metrics() -> None:
    names = ["fq_nmi", "map", "hit_at_10", "recall_at_10", "hit_at_1", "map_at_r", "n_queries"]
    assert ordered_metrics(names) == [
        "map_at_r",
        "hit_at_1",
        "hit_at_10",
        "map",
        "fq_nmi",
        "n_queries",
        "recall_at_10",
    ]


def test_main_params_are_the_effective_settings() -> None:
    from imgsearch.config import load_config

    cfg = load_config("ci", {"extract.weights": "none", "demo.limit": 20})
    params = effective_params(cfg, "ci", finetune=True, promote=True)
    assert params["backbone"] == cfg["extract"]["backbone"] and params["weights"] == "none"
    assert params["limit"] == 20 and params["profile"] == "ci"
    assert params["finetune.method"] == cfg["finetune"]["method"]
    assert all(v not in ("", None) for k, v in params.items() if k != "factory"), params
    assert "finetune.method" not in effective_params(cfg, None, finetune=False, promote=True)


def test_drift_help_imports_nothing_heavy() -> None:
    """``python -m monitoring.drift --help`` answers without importing mlflow, torch, pandas..."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['drift', '--help']\n"
        "try:\n"
        "    runpy.run_module('monitoring.drift', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'mlflow', 'pandas', 'numpy', 'evidently', 'sklearn', 'imgsearch')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "--reference-run-id" in out
    assert "LOADED []" in out, out


def test_a_drift_score_shown_is_never_negative() -> None:
    from imgsearch.monitor.scores import DriftResult

    result = DriftResult("mmd", -0.0004, 0.002, False, 100, 50, 0.1)
    assert result.metrics()["drift_score"] == 0.0
    assert result.metrics()["drift_score_signed"] == -0.0004  # the verdict's own figure, kept
    assert DriftResult("mmd", 0.01, 0.002, True, 100, 50, 0.1).metrics()["drift_score"] == 0.01


def test_drift_try_finds_a_new_style_and_no_drift_in_the_a_a(
    mlflow_store: str, tmp_path: Path
) -> None:
    """``monitoring.drift_try``: one vendor's images (shifted) are drift of kind ``shift``; a sample
    of the others is not drift; a category held out of everything (far away) is drift of kind
    ``novel``; all are drift runs nested under one ``drift_try`` run."""
    import numpy as np
    import pandas as pd

    from imgsearch.embed.files import save_embeddings
    from monitoring import drift_try

    rng = np.random.default_rng(0)
    n_a, n_b = 240, 80
    protos = np.zeros((40, 8))  # 40 items in dimensions 2..7
    protos[:, 2:] = rng.normal(size=(40, 6))
    protos[:, 2] += 2.0
    emb = protos[np.arange(n_a + n_b) % 40] + 0.3 * rng.normal(size=(n_a + n_b, 8))
    emb[n_a:, 0] += 1.0  # vendor b draws the same items in another style
    far = np.arange(len(emb)) % 8 == 0  # category "far": another domain, in every vendor
    emb[far] = rng.normal(size=(int(far.sum()), 8)) * 0.3 + np.eye(8)[1] * 6.0
    emb = emb.astype(np.float32)
    ids = np.array([f"{'a' if i < n_a else 'b'}/{i}" for i in range(n_a + n_b)])
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "item_id": [f"item{i % 40}" for i in range(len(ids))],
            "vendor": ["a"] * n_a + ["b"] * n_b,
            "category": np.where(far, "far", "near"),
        }  # fmt: skip
    )
    with mlflow.start_run() as extract:
        mlflow.log_artifact(str(save_embeddings(tmp_path / "embeddings.parquet", ids, emb)))
    with mlflow.start_run() as split:
        common.log_df(manifest, "manifest.parquet")
    with mlflow.start_run() as main:
        mlflow.set_tags(
            {
                "imgsearch.stage": "main",
                "imgsearch.run.extract": extract.info.run_id,
                "imgsearch.run.split": split.info.run_id,
            }  # fmt: skip
        )
    assert drift_try.latest_main_run() == main.info.run_id
    overrides = {"drift.report": "none", "drift.calibration_trials": 40}
    new_style, aa, domain = drift_try.run(
        None, "vendor", "b", overrides=overrides, domain_column="category", domain_value="far"
    )
    client = MlflowClient()
    kinds = [
        client.get_run(s.drift_run).data.tags["imgsearch.drift.kind"]
        for s in (new_style, aa, domain)
    ]
    assert kinds == ["shift", "none", "novel"]
    assert "| new domain category=far |" in drift_try.table([new_style, aa, domain])
    assert client.get_run(new_style.drift_run).data.metrics["drift_detected"] == 1.0
    assert client.get_run(aa.drift_run).data.metrics["drift_detected"] == 0.0
    assert client.get_run(aa.drift_run).data.metrics["drift_score"] >= 0.0
    assert client.get_run(new_style.drift_run).info.run_name == "drift · new style vendor=b"
    with pytest.raises(SystemExit, match="no column 'style'"):
        drift_try.run(main.info.run_id, "style", None, overrides=overrides)


def test_evaluation_report_shows_queries_with_thumbnails_and_marks_relevant(
    tmp_path: Path,
) -> None:
    import pandas as pd
    from PIL import Image

    from imgsearch.evaluate.report import evaluation_html

    paths = {}
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        paths[f"im{i}"] = str(tmp_path / f"im{i}.png")
        Image.new("RGB", (32, 32), colour).save(paths[f"im{i}"])
    items_of = {"im0": "a", "im1": "a", "im2": "b", "im3": "b"}
    per_query = pd.DataFrame(
        {
            "image_id": ["im0", "im2"],
            "item_id": ["a", "b"],
            "ap": [1.0, 0.25],
            "top_ids": ["im1;im2", "im0;im1;im3"],
        }
    )
    per_category = pd.DataFrame(
        {"category": ["shapes", "flags"], "n_queries": [1, 1], "map_at_r": [0.2, 0.9]}
    )
    page = evaluation_html(
        {"map_at_r": 0.5, "hit_at_1": 0.5, "n_queries": 2, "n_gallery": 4},
        per_query,
        per_category,
        paths,
        items_of,
        "evaluate · baseline mobilenet_v2",
    )
    examples = page.split("id='examples'>")[1].split("</table>")[0]
    assert examples.count("<img") == 2 + 5  # two queries and their five results
    assert examples.count("3px solid #2a2") == 2  # im1 for im0, im3 for im2: relevant
    worst = page.split("id='worst'>")[1].split("</table>")[0]
    assert worst.index("im2") < worst.index("im0")  # lowest AP first
    assert page.index("flags") < page.index("shapes")  # categories sorted by MAP@R
    assert "MAP@R: precision over the first R results" in page
