"""Drift: compare the embeddings of new data with the reference's, decide, explain, report.

Inputs: ``--reference-run-id`` and ``--current-run-id``, two runs holding ``embeddings.parquet``
(the extract stage; made with the same extractor, which is checked when both files record its
fingerprint) and, optionally, ``manifest.parquet`` (for the category / NSFW / format shift).
Settings: ``configs/drift.yaml`` (:class:`imgsearch.monitor.drift.DriftConfig`).

Produces (an MLflow run tagged ``imgsearch.stage=drift``): metrics ``drift_score``,
``drift_threshold``, ``drift_detected``, ``drift_effect`` (score / threshold: ``> 1`` means drift),
``knn_novel_share`` (share of new images whose nearest reference image is farther than 99% of the
reference's own nearest-neighbour distances), ``knn_distance_ratio`` (their median distance over
the reference's), ``centroid_novel_share`` and the A/A calibration figures (``aa_threshold``,
``aa_false_alarm_rate``, ``aa_evidently_default_false_alarm_rate``, ...); tags
``imgsearch.drift.verdict`` (``drift`` | ``no_drift``) and ``imgsearch.drift.kind`` (``none`` |
``shift``: drift among things the reference knows | ``novel``: a new domain); artifacts ``drift/clusters.csv`` (which
reference clusters grew or shrank), ``drift/metadata_shift.csv``, ``drift/aa_calibration.png``
(null scores, calibrated and default thresholds, observed score) and ``drift/report.html``
(Evidently's embeddings-drift report, on a sample by default: its t-SNE plot is most of its cost).

The verdict is computed by :mod:`imgsearch.monitor.drift` (Evidently's method without the plot) with the
calibrated threshold; the Evidently report is built with the same method and threshold.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

# Only the standard library at import: `python -m monitoring.drift --help` answers at once; mlflow,
# numpy, pandas, Evidently and the library are imported by the functions that use them.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from imgsearch.monitor.drift import DriftAnalysis, DriftConfig

log = logging.getLogger(__name__)

STAGE = "drift"
TAG_VERDICT = "imgsearch.drift.verdict"
TAG_KIND = "imgsearch.drift.kind"
EMBEDDINGS = "embeddings.parquet"
_EMB = "emb"


def evidently_method(
    method: str,
    threshold: float | None = None,
    *,
    bootstrap: bool | None = None,
    quantile_probability: float | None = None,
    pca_components: int | None = None,
    distance: str = "euclidean",
    component_threshold: float = 0.1,
) -> Any:
    """The Evidently 0.7 ``DriftMethod`` matching :func:`imgsearch.monitor.drift.drift_verdict`'s settings."""
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    from imgsearch.monitor.drift import EVIDENTLY_THRESHOLDS

    limit = EVIDENTLY_THRESHOLDS[method] if threshold is None else float(threshold)
    extra: dict[str, Any] = {}
    if quantile_probability is not None:
        extra["quantile_probability"] = quantile_probability
    if method == "mmd":
        return MMDDriftMethod(
            threshold=limit, bootstrap=bootstrap, pca_components=pca_components, **extra
        )
    if method == "model":
        return ModelDriftMethod(
            threshold=limit, bootstrap=bootstrap, pca_components=pca_components, **extra
        )
    if method == "ratio":
        return RatioDriftMethod(
            component_stattest="wasserstein",
            component_stattest_threshold=component_threshold,
            threshold=limit,
            pca_components=pca_components,
        )
    return DistanceDriftMethod(
        dist=distance,
        threshold=limit,
        bootstrap=bootstrap,
        pca_components=pca_components,
        **extra,
    )


def evidently_report(
    reference: np.ndarray,
    current: np.ndarray,
    drift_method: Any | None = None,
) -> tuple[str, float, bool, float]:
    """Run Evidently's ``EmbeddingsDrift`` report -> ``(html, score, drift_detected, seconds)``.

    ``drift_method`` ``None`` is Evidently's default (``model``, bootstrapped under 1,000
    reference rows). The verdict is read from the report's legacy metric result.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift

    cols = [f"e{i}" for i in range(reference.shape[1])]
    definition = DataDefinition(embeddings={_EMB: cols}, numerical_columns=cols)
    ref = Dataset.from_pandas(pd.DataFrame(reference, columns=cols), data_definition=definition)
    cur = Dataset.from_pandas(pd.DataFrame(current, columns=cols), data_definition=definition)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([EmbeddingsDrift(embeddings_name=_EMB, drift_method=drift_method)]).run(
            cur, ref
        )
    seconds = time.perf_counter() - t0
    score, detected = _legacy_verdict(snapshot)
    return snapshot.get_html_str(as_iframe=False), score, detected, seconds


def _legacy_verdict(snapshot: Any) -> tuple[float, bool]:
    # Evidently 0.7's EmbeddingsDrift keeps only the score in its public value; the verdict lives
    # in the wrapped legacy metric's result (EmbeddingsDriftMetricResults).
    for result, _widgets in snapshot.context._legacy_metrics.values():
        if hasattr(result, "drift_detected"):
            return float(result.drift_score), bool(result.drift_detected)
    raise RuntimeError("Evidently report holds no embeddings-drift result")


def _sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    import numpy as np

    if x.shape[0] <= n:
        return x
    return x[np.random.default_rng(seed).choice(x.shape[0], n, replace=False)]


def aa_figure(analysis: DriftAnalysis) -> Any:
    """Histogram of the A/A null scores with the calibrated and default thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = analysis.calibration
    fig, ax = plt.subplots(figsize=(7, 4))
    if cal is not None:
        ax.hist(cal.null_scores, bins=30, color="0.7", label=f"A/A scores ({cal.null_scores.size})")
        ax.axvline(cal.threshold, color="C0", label=f"calibrated ({cal.false_alarm_rate:.0%})")
        ax.axvline(cal.evidently_threshold, color="C1", ls="--", label="Evidently default")
    observed = analysis.result.shown_score
    if cal is None or cal.null_scores.size == 0:
        ax.axvline(observed, color="C3", lw=2, label="observed")
    else:
        # the A/A scores keep their own scale: an observed score far beyond them is named, not drawn
        lo, hi = ax.get_xlim()
        if observed <= hi + 0.5 * (hi - lo):
            ax.axvline(observed, color="C3", lw=2, label=f"observed {observed:.3g}")
        else:
            ratio = observed / cal.threshold if cal.threshold > 0 else float("inf")
            ax.annotate(
                f"observed {observed:.3g} (off scale, {ratio:.0f}x the threshold) \u2192",
                xy=(1.0, 0.5),
                xycoords="axes fraction",
                ha="right",
                color="C3",
            )
    ax.set_xlabel(f"{analysis.result.method} drift score")
    ax.set_title("A/A calibration: scores of reference-vs-reference splits")
    ax.legend()
    fig.tight_layout()
    return fig


def summary_line(analysis: DriftAnalysis) -> str:
    """One line a reviewer can act on: verdict, effect size, kind and the novelty behind it."""
    result, nov = analysis.result, analysis.novelty
    return (
        f"drift {'DETECTED' if result.drift else 'not detected'} (kind {analysis.kind}): "
        f"{result.method} score {result.shown_score:.5g} vs threshold {result.threshold:.5g} "
        f"(effect {result.effect:.3g}x); {nov.novel_share:.0%} of new images are farther from "
        f"the reference than {nov.quantile:.0%} of its own nearest-neighbour distances "
        f"(median distance ratio {nov.distance_ratio:.2f})"
    )


def _load(run_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    from imgsearch.embed.files import embeddings_metadata, load_embeddings
    from steps.common import artifact_path

    path = artifact_path(run_id, EMBEDDINGS)
    ids, emb = load_embeddings(path)
    return ids, emb, embeddings_metadata(path)


def _manifest(run_id: str) -> pd.DataFrame | None:
    from steps.common import read_df

    try:
        return read_df(run_id, "manifest.parquet")
    except Exception as exc:  # optional input: a run without a manifest only loses this table
        log.info("run %s has no manifest.parquet (%s): no metadata shift", run_id, exc)
        return None


def run(
    reference_run_id: str,
    current_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:

    import mlflow

    from imgsearch.config import from_dict
    from imgsearch.errors import ExtractorMismatchError
    from imgsearch.monitor.drift import DriftConfig, analyse, metadata_shift
    from steps.common import log_metrics, stage_run

    with stage_run(STAGE, overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.reference_run_id": reference_run_id,
                "imgsearch.input.current_run_id": current_run_id,
            }
        )
        cfg = from_dict(DriftConfig, all_cfg.get(STAGE))
        ref_ids, ref, ref_meta = _load(reference_run_id)
        _cur_ids, cur, cur_meta = _load(current_run_id)
        fps = {ref_meta.get("extractor_fingerprint"), cur_meta.get("extractor_fingerprint")}
        if len(fps - {None}) > 1:
            raise ExtractorMismatchError(
                "reference and current embeddings come from different extractors: "
                f"{ref_meta.get('extractor_fingerprint')} vs {cur_meta.get('extractor_fingerprint')}"
            )
        analysis = analyse(ref, cur, cfg, reference_ids=ref_ids)
        result = analysis.result
        mlflow.set_tags(
            {TAG_VERDICT: "drift" if result.drift else "no_drift", TAG_KIND: analysis.kind}
        )
        log_metrics(analysis.metrics)
        log.info("%s", summary_line(analysis))
        mlflow.log_text(analysis.clusters.to_csv(index=False), "drift/clusters.csv")
        ref_manifest, cur_manifest = _manifest(reference_run_id), _manifest(current_run_id)
        if ref_manifest is not None and cur_manifest is not None:
            table, meta_metrics = metadata_shift(ref_manifest, cur_manifest)
            mlflow.log_text(table.to_csv(index=False), "drift/metadata_shift.csv")
            log_metrics({f"meta_{k}": v for k, v in meta_metrics.items()})
        fig = aa_figure(analysis)
        mlflow.log_figure(fig, "drift/aa_calibration.png")
        import matplotlib.pyplot as plt

        plt.close(fig)

        if cfg.report != "none":
            _log_evidently_report(cfg, ref, cur, result.threshold)
        return active.info.run_id


def _log_evidently_report(cfg: DriftConfig, ref: Any, cur: Any, threshold: float) -> None:
    """Evidently's HTML report beside the verdict. It is a view, not the verdict: when Evidently
    fails on the data (its KDE plot raises on a handful of near-identical new images), the run
    says why (tag ``imgsearch.drift.report_error``) and the verdict stands."""
    import tempfile
    from pathlib import Path

    import mlflow

    from steps.common import log_metrics

    n = cfg.report_sample if cfg.report == "sample" else max(len(ref), len(cur))
    method = evidently_method(cfg.method, threshold, **cfg.method_params())
    try:
        html, ev_score, ev_drift, seconds = evidently_report(
            _sample(ref, n, cfg.seed), _sample(cur, n, cfg.seed + 1), method
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the optional report
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("drift: Evidently's report failed, the verdict stands (%s)", reason)
        mlflow.set_tag("imgsearch.drift.report_error", reason)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        path.write_text(html, encoding="utf-8")
        mlflow.log_artifact(str(path), "drift")
    log_metrics(
        {
            "report_seconds": seconds,
            "report_rows": float(min(n, len(ref)) + min(n, len(cur))),
            "report_drift_score": ev_score,
            "report_drift_detected": float(ev_drift),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="", help="config profile (configs/profiles/NAME.yaml)")
    parser.add_argument(
        "--reference-run-id", required=True, help="run with the reference embeddings"
    )
    parser.add_argument("--current-run-id", required=True, help="run with the new embeddings")
    parser.add_argument("--method", default="", help="mmd | model | ratio | distance")
    parser.add_argument("--threshold", default="", help="fixed threshold (default: calibrated)")
    parser.add_argument("--false-alarm-rate", default="", help="A/A false-alarm level")
    parser.add_argument("--report", default="", help="sample | full | none")
    args = parser.parse_args()
    from steps.common import setup_logging

    setup_logging()
    run_id = run(
        args.reference_run_id,
        args.current_run_id,
        overrides={
            "drift.method": args.method,
            "drift.threshold": args.threshold,
            "drift.false_alarm_rate": args.false_alarm_rate,
            "drift.report": args.report,
        },
        profile=args.profile or None,
    )
    print(run_id)


if __name__ == "__main__":
    main()
