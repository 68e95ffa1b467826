"""Drift: verdicts, A/A calibration, explanations, parity with Evidently, and the MLflow stage."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.monitor import drift, scores

D = 16
CENTERS = np.random.default_rng(123).normal(size=(4, D)) * 3.0


def mixture(n: int, weights: tuple[float, ...], seed: int, extra: np.ndarray | None = None):
    """``n`` points from Gaussian blobs around ``CENTERS`` (plus ``extra`` centres) in ``weights``."""
    rng = np.random.default_rng(seed)
    centers = CENTERS if extra is None else np.vstack([CENTERS, extra])
    labels = rng.choice(len(centers), size=n, p=np.asarray(weights) / sum(weights))
    return centers[labels] + rng.normal(size=(n, D)), labels


BASE = (1.0, 1.0, 1.0, 1.0)
GROWN = (1.0, 1.0, 1.0, 4.0)  # blob 3 grows from 25% to 57%


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return mixture(400, BASE, seed=0)[0]


@pytest.fixture(scope="module")
def calibration(reference: np.ndarray) -> drift.Calibration:
    return drift.calibrate(reference, window=100, method="mmd", false_alarm_rate=0.1, n_trials=99)


# --- verdicts ----------------------------------------------------------------------------------


def test_drift_flagged_on_shifted_set_not_on_aa_split(
    reference: np.ndarray, calibration: drift.Calibration
) -> None:
    shifted = mixture(100, GROWN, seed=1)[0]
    same = mixture(100, BASE, seed=2)[0]
    hit = drift.drift_verdict(reference, shifted, "mmd", calibration.threshold)
    calm = drift.drift_verdict(reference, same, "mmd", calibration.threshold)
    assert hit.drift and hit.score > calibration.threshold
    assert not calm.drift
    # an A/A split of the reference itself is not flagged either
    perm = np.random.default_rng(5).permutation(len(reference))
    aa = drift.drift_verdict(
        reference[perm[:300]], reference[perm[300:]], "mmd", calibration.threshold
    )
    assert not aa.drift


def test_calibration_false_alarm_rate_at_or_below_level(
    reference: np.ndarray, calibration: drift.Calibration
) -> None:
    assert calibration.window == 100 and calibration.n_reference == 300
    assert calibration.in_sample_rate <= 0.1
    # fresh reference-vs-reference samples of the production sizes (300 vs the window of 100)
    alarms = []
    for seed in range(100, 250):
        x = mixture(400, BASE, seed=seed)[0]
        alarms.append(drift.drift_verdict(x[:300], x[300:], "mmd", calibration.threshold).drift)
    rate = float(np.mean(alarms))
    # 150 trials: binomial standard error at p = 0.1 is 0.024; allow two of them
    assert rate <= 0.1 + 2 * math.sqrt(0.1 * 0.9 / 150), rate


def test_conformal_threshold_matches_rank_definition() -> None:
    scores = np.random.default_rng(0).normal(size=19)
    ranked = sorted(scores)
    # (19 + 1) * 0.9 = 18 -> the 18th smallest; a new exchangeable score beats it w.p. 2/20 = 0.1
    assert drift.conformal_threshold(scores, 0.1) == ranked[17]
    assert drift.conformal_threshold(scores, 0.01) == ranked[-1]  # too few trials: the maximum
    with pytest.raises(ValueError):
        drift.conformal_threshold(np.array([]), 0.1)


def test_aa_sizes() -> None:
    assert drift.aa_sizes(1000, 100) == (900, 100)
    assert drift.aa_sizes(150, 100) == (75, 75)
    with pytest.raises(ValueError):
        drift.aa_sizes(3, 1)


def test_bad_arguments_raise() -> None:
    x = np.zeros((5, 3))
    with pytest.raises(ConfigError):
        drift.drift_verdict(x, x, "kl")
    with pytest.raises(ValueError):
        drift.drift_verdict(x, np.zeros((5, 4)))
    with pytest.raises(ValueError):
        drift.drift_verdict(x, np.zeros(5))
    with pytest.raises(ConfigError):
        drift.DriftConfig(false_alarm_rate=1.5)


def test_mmd_blockwise_equals_dense_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.2
    gamma = 0.1
    z = np.vstack([x, y])
    k = np.exp(-gamma * ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    m, n = len(x), len(y)
    naive = (
        sum(k[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        + sum(k[i, j] for i in range(m, m + n) for j in range(m, m + n) if i != j) / (n * (n - 1))
        - 2 * k[:m, m:].sum() / (m * n)
    )
    monkeypatch.setattr(scores, "_BLOCK", 7)  # several blocks, the last one partial
    assert drift.mmd2u(x, y, gamma) == pytest.approx(naive, rel=1e-9, abs=1e-12)


# --- explanations ------------------------------------------------------------------------------


def test_explain_shift_finds_the_cluster_that_grew(reference: np.ndarray) -> None:
    current, labels = mixture(200, GROWN, seed=7)
    table = drift.explain_shift(reference, current, k=4)
    clusters = table[table["cluster"] >= 0]
    top = clusters.iloc[0]
    assert top["delta"] > 0.2 and top["z"] > 3
    # the cluster that grew is the one holding blob 3's points
    grown_blob = current[labels == 3]
    centre = grown_blob.mean(0)
    ref_in_top = reference[
        [int(i) for i in str(top["examples"]).split(";")]
    ]  # examples are reference positions
    assert np.linalg.norm(ref_in_top.mean(0) - centre) < np.linalg.norm(CENTERS[0] - CENTERS[3])
    assert clusters["ref_share"].sum() == pytest.approx(1.0)
    assert clusters["cur_share"].sum() == pytest.approx(1.0)
    assert table.iloc[-1]["cluster"] == -1


def test_explain_shift_counts_novel_points(reference: np.ndarray) -> None:
    far = CENTERS.mean(0, keepdims=True) + 40.0
    current = mixture(200, (1, 1, 1, 1, 4), seed=8, extra=far)[0]
    novel = drift.explain_shift(reference, current, k=4).set_index("cluster").loc[-1]
    assert novel["cur_share"] > 0.35 and novel["ref_share"] <= 0.011


def test_analyse_tells_a_new_mix_from_a_new_domain(
    reference: np.ndarray, calibration: drift.Calibration
) -> None:
    """Effect size and kind beside the verdict: a grown blob is a ``shift`` (every new point sits
    near reference points), blobs in new directions are ``novel``, a same-mix sample is ``none``."""
    cfg = drift.DriftConfig(threshold=calibration.threshold, clusters=4)
    new_centres = np.random.default_rng(77).normal(size=(4, D)) * 3.0
    rng = np.random.default_rng(78)
    domain = new_centres[rng.integers(0, 4, 200)] + rng.normal(size=(200, D))
    same = drift.analyse(reference, mixture(200, BASE, seed=11)[0], cfg)
    mix = drift.analyse(reference, mixture(200, GROWN, seed=7)[0], cfg)
    new = drift.analyse(reference, domain, cfg)
    assert (same.kind, mix.kind, new.kind) == ("none", "shift", "novel")
    for a in (same, mix, new):
        m = a.metrics
        assert m["drift_effect"] == pytest.approx(m["drift_score"] / m["drift_threshold"])
        assert (m["drift_effect"] > 1) == bool(m["drift_detected"])
        assert "novel_share" not in m and 0 <= m["centroid_novel_share"] <= 1
    assert mix.metrics["knn_novel_share"] < 0.1 < 0.9 < new.metrics["knn_novel_share"]
    assert new.metrics["drift_effect"] > mix.metrics["drift_effect"] > 1
    assert new.metrics["knn_distance_ratio"] > 2 * mix.metrics["knn_distance_ratio"]
    with pytest.raises(ConfigError):
        drift.DriftConfig(novel_share_max=1.5)


def test_metadata_shift() -> None:
    ref = pd.DataFrame(
        {
            schema.CATEGORY: ["a"] * 6 + ["b"] * 4,
            schema.NSFW: [0] * 9 + [1],
            schema.FORMAT: ["PNG"] * 10,
        }
    )
    cur = pd.DataFrame(
        {
            schema.CATEGORY: ["a"] * 2 + ["c"] * 2,
            schema.NSFW: [1, 1, 0, None],
            schema.FORMAT: ["PNG", "JPEG", "JPEG", "JPEG"],
        }
    )
    table, metrics = drift.metadata_shift(ref, cur)
    cat = table[table["attribute"] == schema.CATEGORY].set_index("value")
    assert cat.loc["a", "delta"] == pytest.approx(0.5 - 0.6)
    assert cat.loc["b", "cur_share"] == 0 and cat.loc["c", "ref_share"] == 0
    assert metrics["tv_category"] == pytest.approx(0.5)  # (0.1 + 0.4 + 0.5) / 2
    assert metrics["tv_format"] == pytest.approx(0.75)
    assert metrics["nsfw_share_ref"] == pytest.approx(0.1)
    assert metrics["nsfw_share_cur"] == pytest.approx(2 / 3)
    # an absent column is skipped, not invented
    table2, metrics2 = drift.metadata_shift(ref[[schema.CATEGORY]], cur[[schema.CATEGORY]])
    assert set(table2["attribute"]) == {schema.CATEGORY} and "tv_format" not in metrics2


# --- parity with Evidently ---------------------------------------------------------------------


def _frame(x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(x, columns=[f"e{i}" for i in range(x.shape[1])])


@pytest.mark.parametrize("method", drift.METHODS)
@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_fast_verdict_equals_evidently_method(method: str, shift: float) -> None:
    from monitoring.drift import evidently_method

    ref = mixture(300, BASE, seed=11)[0]
    cur = mixture(120, BASE, seed=12)[0] + shift
    fast = drift.drift_verdict(ref, cur, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score, detected, name = evidently_method(method)(_frame(cur), _frame(ref))
    assert name == method
    assert bool(detected) == fast.drift
    assert float(score) == pytest.approx(max(fast.score, 0.0) if method == "mmd" else fast.score)


class _FastTSNE:
    """Stand-in for the report's t-SNE (a plot only; it is most of the report's time)."""

    def __init__(self, n_components: int = 2, **_: object) -> None:
        self.n_components = n_components

    def fit_transform(self, x: pd.DataFrame) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)[:, : self.n_components]


@pytest.fixture
def fast_tsne(monkeypatch: pytest.MonkeyPatch) -> None:
    from evidently.legacy.metrics.data_drift import embeddings_drift

    monkeypatch.setattr(embeddings_drift, "TSNE", _FastTSNE)


def test_fast_verdict_equals_evidently_report() -> None:
    """The whole Evidently report (real t-SNE), on a shifted case."""
    from monitoring.drift import evidently_method, evidently_report

    ref = mixture(120, BASE, seed=21)[0]
    for cur, expected in ((mixture(80, GROWN, seed=22)[0], True),):
        fast = drift.drift_verdict(ref, cur, "mmd", 0.01)
        html, score, detected, _seconds = evidently_report(ref, cur, evidently_method("mmd", 0.01))
        assert detected == fast.drift
        assert score == pytest.approx(max(fast.score, 0.0))
        assert "<html" in html.lower()
        assert detected is expected


@pytest.mark.slow
def test_fast_verdict_equals_evidently_report_no_drift() -> None:
    from monitoring.drift import evidently_method, evidently_report

    ref = mixture(120, BASE, seed=21)[0]
    cur = mixture(80, BASE, seed=23)[0]
    fast = drift.drift_verdict(ref, cur, "mmd", 0.01)
    _html, score, detected, _seconds = evidently_report(ref, cur, evidently_method("mmd", 0.01))
    assert detected is fast.drift is False
    assert score == pytest.approx(max(fast.score, 0.0))


# --- the MLflow stage --------------------------------------------------------------------------


@pytest.mark.parametrize("report_fails", [False, True])
def test_drift_stage_logs_verdict_and_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_tsne: None, report_fails: bool
) -> None:
    """The verdict and its artifacts; Evidently's report failing on the data (its KDE plot raises
    LinAlgError on a few near-identical new images) costs the report only, with the reason."""
    from imgsearch.embed.files import save_embeddings
    from monitoring import drift as stage

    if report_fails:

        def singular(*_args: object, **_kw: object) -> None:
            raise np.linalg.LinAlgError("singular data covariance matrix")

        monkeypatch.setattr(stage, "evidently_report", singular)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("drift", artifact_location=(tmp_path / "art").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)

    def make_run(emb: np.ndarray, categories: list[str]) -> str:
        ids = [f"img{i}" for i in range(len(emb))]
        with mlflow.start_run(experiment_id=exp) as r:
            save_embeddings(tmp_path / r.info.run_id / "embeddings.parquet", ids, emb)
            mlflow.log_artifact(str(tmp_path / r.info.run_id / "embeddings.parquet"))
            manifest = pd.DataFrame({schema.IMAGE_ID: ids, schema.CATEGORY: categories})
            manifest.to_parquet(tmp_path / r.info.run_id / "manifest.parquet")
            mlflow.log_artifact(str(tmp_path / r.info.run_id / "manifest.parquet"))
        return r.info.run_id

    ref_emb, ref_lab = mixture(300, BASE, seed=31)
    cur_emb, cur_lab = mixture(100, GROWN, seed=32)
    ref_id = make_run(ref_emb.astype(np.float32), [f"c{i}" for i in ref_lab])
    cur_id = make_run(cur_emb.astype(np.float32), [f"c{i}" for i in cur_lab])
    try:
        run_id = stage.run(
            ref_id,
            cur_id,
            overrides={
                "drift.calibration_trials": 39,
                "drift.report_sample": 60,
                "drift.clusters": 4,
            },
        )
        data = mlflow.get_run(run_id).data
    finally:
        mlflow.set_tracking_uri(None)
    assert data.tags["imgsearch.stage"] == "drift"
    assert data.tags["imgsearch.drift.verdict"] == "drift"
    assert data.tags["imgsearch.drift.kind"] == "shift"  # a new mix of known blobs
    assert data.metrics["drift_effect"] > 1 and data.metrics["knn_novel_share"] < 0.5
    assert {"knn_distance_ratio", "centroid_novel_share"} <= set(data.metrics)
    assert data.metrics["drift_detected"] == 1.0
    assert data.metrics["drift_score"] > data.metrics["aa_threshold"]
    assert 0 <= data.metrics["aa_false_alarm_rate"] <= 0.05
    assert data.metrics["meta_tv_category"] > 0.2
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "drift")}
    assert {
        "drift/clusters.csv",
        "drift/metadata_shift.csv",
        "drift/aa_calibration.png",
    } <= arts
    assert ("drift/report.html" in arts) != report_fails
    error = data.tags.get("imgsearch.drift.report_error", "")
    assert ("LinAlgError: singular" in error) == report_fails
