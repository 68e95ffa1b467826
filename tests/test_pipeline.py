"""End to end: ``steps.main`` on a small synthetic folder catalog, in a private MLflow store.

Every stage leaves a nested run under the parent, the two models are registered with aliases,
and the headline test metrics reach the parent run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from registry.promote import PromoteConfig
from steps.artifacts import artifact_path
from tests.conftest import make_folder_catalog

RETRIEVAL = ("extract", "index", "evaluate", "align", "register", "promote")
SHAPES = {
    3: ("triangle", "треугольник"),
    4: ("square", "квадрат"),
    5: ("pentagon", "пятиугольник"),
    6: ("hexagon", "шестиугольник"),
    7: ("heptagon", "семиугольник"),
}


def write_texts(path: Path, n_items: int = 15) -> Path:
    """English and Russian labels and tags of the folder catalog's polygons (one restricted)."""
    rows = []
    for i in range(n_items):
        en, ru = SHAPES[3 + i % 5]
        item = f"item{i:02d}"
        rows += [
            (item, "en", "label", f"{en} shape"),
            (item, "ru", "label", f"{ru}"),
            (item, "en", "tag", en),
            (item, "en", "tag", "polygon"),
            (item, "ru", "tag", "фигура"),
        ]
    rows.append(("item01", "en", "tag", "a child's drawing"))  # restricted: item01 left out
    pd.DataFrame(rows, columns=["item_id", "lang", "kind", "text"]).to_csv(path, index=False)
    return path


STAGES = ("ingest", "validate", "preprocess", "eda", "split", *RETRIEVAL)
#: run-id tags on the parent: the baseline stages, then the fine-tuned model's
PARENT_TAGS = (*STAGES, "finetune", *(f"finetuned.{s}" for s in RETRIEVAL))


def test_main_runs_every_stage_nested_and_registers(tmp_path: Path, mlflow_store: str) -> None:
    from steps import main

    data = make_folder_catalog(tmp_path / "catalog")
    overrides = {
        "ingest.source": "folder",
        "ingest.path": str(data),
        "ingest.texts_path": str(write_texts(tmp_path / "texts.csv")),
        "extract.backbone": "mobilenet_v2",
        "extract.weights": "none",
        "preprocess.size": 64,
        "eda.thumbnails": 0,
        "evaluate.plots": False,
    }
    parent_id = main.run(profile="ci", overrides=overrides)

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(r.data.tags["imgsearch.stage"] for r in children) == sorted(
        (*STAGES, "finetune", *RETRIEVAL, "categorize")
    )
    assert all(r.info.status == "FINISHED" for r in children)

    # a reviewer tells the runs apart in the MLflow UI: a named experiment in the model-training
    # view, runs named for what they are, tagged with their role, settings as params
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "imgsearch"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == "main · mobilenet_v2 (ci)"
    names = {r.info.run_name: r for r in children}
    for role in ("baseline", "finetuned"):
        for stage in RETRIEVAL:
            run = names[f"{stage} · {role} mobilenet_v2"]
            assert run.data.tags["imgsearch.role"] == role
    assert names["finetune · finetuned mobilenet_v2"].data.tags["imgsearch.role"] == "finetuned"
    assert "imgsearch.role" not in names["ingest"].data.tags
    # the whole collection categorised with the final (fine-tuned) extractor, named from its
    # align run's keywords; measured against the hidden labels
    collection = names["categorize · collection (finetuned)"]
    finetuned_extract = names["extract · finetuned mobilenet_v2"]
    assert collection.data.tags["imgsearch.input.extract_run_id"] == finetuned_extract.info.run_id
    assert collection.data.metrics["n_images"] == finetuned_extract.data.metrics["n_ok"]
    assert "cluster_keywords_en_precision_at_5" in collection.data.metrics  # named by keywords
    assert "gallery/categories.html" in {
        f.path for f in client.list_artifacts(collection.info.run_id, "gallery")
    }
    params = parent.data.params
    assert params["backbone"] == "mobilenet_v2" and params["weights"] == "none"
    assert params["profile"] == "ci" and params["finetune.method"] == "supcon"
    assert "baseline" in parent.data.tags["mlflow.note.content"]
    assert "| map_at_r |" in parent.data.tags["mlflow.note.content"]
    extract_run = names["extract · baseline mobilenet_v2"]
    settings = {"batch_size", "bf16_used", "compile_used", "num_workers", "threads", "dim"}
    for run in children:
        assert not settings & set(run.data.metrics), (run.info.run_name, run.data.metrics)
    assert extract_run.data.params["batch_size"] and "images_per_s" in extract_run.data.metrics
    evaluate_id = names["evaluate · finetuned mobilenet_v2"].info.run_id
    page = mlflow.artifacts.load_text(f"runs:/{evaluate_id}/report.html")
    assert "Worst queries" in page and page.count("<img") > 10
    summary = mlflow.artifacts.load_text(f"runs:/{parent_id}/summary.md")
    assert "gate: index v2" in summary and "make ui" in summary
    for stage in PARENT_TAGS:
        assert parent.data.tags[f"imgsearch.run.{stage}"]

    # nothing silently dropped: the broken file is in quarantine, the rest is clean
    validate_run = client.get_run(parent.data.tags["imgsearch.run.validate"])
    assert validate_run.data.metrics["n_clean"] == 45
    assert (
        validate_run.data.metrics["quarantine.corrupt"]
        + validate_run.data.metrics.get("quarantine.truncated", 0)
        == 1
    )

    # text search: aligned for each extractor, on train items only, the restricted item left out
    align_run = client.get_run(parent.data.tags["imgsearch.run.finetuned.align"])
    assert align_run.data.metrics["n_restricted_items"] == 1
    assert "text_label_en_hit_at_10" in align_run.data.metrics
    assert "chance_text_label_ru_map_at_r" in align_run.data.metrics
    text_versions = client.search_model_versions("name = 'imgsearch-text'")
    assert len(text_versions) == 2
    assert {v.tags["index_version"] for v in text_versions} == {"1", "2"}

    assert "test.map_at_r" in parent.data.metrics
    assert 0.0 <= parent.data.metrics["test.map_at_r"] <= 1.0

    assert "finetuned.test.map_at_r" in parent.data.metrics
    baseline, tuned = (
        parent.data.metrics["test.map_at_r"],
        parent.data.metrics["finetuned.test.map_at_r"],
    )

    table = pd.read_parquet(artifact_path(parent_id, "before_after.parquet")).set_index("metric")
    assert table.loc["map_at_r", "baseline"] == pytest.approx(baseline)
    assert table.loc["map_at_r", "finetuned"] == pytest.approx(tuned)
    assert {"fq_nmi", "fq_ratio", "hit_at_1"} <= set(table.index)
    assert list(table.index[:4]) == ["map_at_r", "hit_at_1", "hit_at_10", "map"]
    for name in ("quarantine.csv",):
        assert mlflow.artifacts.load_text(f"runs:/{validate_run.info.run_id}/{name}")

    # the fine-tuned pair is version 2; it is champion only if it won the (strict) gate, and then
    # `challenger` is gone (it names undecided candidates) and `previous` is version 1
    won = tuned - baseline > PromoteConfig().min_delta
    # each version says what it is; its few headline metric tags are rounded
    for name in ("imgsearch-extractor", "imgsearch-index"):
        version = client.get_model_version(name, "2")
        assert "finetuned" in version.description and "map_at_r" in version.description
        metric_tags = {k: v for k, v in version.tags.items() if k.startswith("metric.")}
        assert "metric.map_at_r" in metric_tags and len(metric_tags) <= 6, metric_tags
        assert all(len(v.split(".")[-1]) <= 4 for v in metric_tags.values()), metric_tags
    for name in ("imgsearch-extractor", "imgsearch-index"):
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
        if won:
            assert aliases.get("champion") == "2" and aliases.get("previous") == "1"
            assert "challenger" not in aliases
        else:
            assert aliases.get("champion") == "1" and aliases.get("challenger") == "2"
