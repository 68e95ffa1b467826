"""Drift you can try after ``make demo``: a new style of things we know, and an A/A that is not drift.

    .venv/bin/python -m monitoring.drift_try [--main-run-id ID] [--column vendor] [--value facebook]
        [--domain-column category --domain-value Flags]

From a ``main`` run (default: the latest finished one), the baseline extract run's embeddings and
the split run's manifest: the **reference** is the images whose ``--column`` is not ``--value``, the
**new data** those that are (by default one vendor's drawings: the same emoji in another style);
the **A/A** check is a seeded random sample of the reference, as large as the new data, against
the rest of the reference: nothing changed there, so no drift should be found. Each comparison is a
``drift`` run (:mod:`monitoring.drift`: the calibrated verdict, the Evidently report, the reference
clusters that grew or shrank) nested under one ``drift_try`` run, and the verdicts are printed side
by side with their effect size and kind (``shift`` or ``novel``). With ``--domain-column`` and
``--domain-value`` a third comparison holds that group (say the Flags category) out of everything
else and compares the reference's own vendors' images of it with the reference: a **new domain**,
which should read ``novel`` where the new style reads ``shift``. Settings: ``configs/drift.yaml``
(``--report none`` skips the Evidently HTML).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only the standard library at import: --help answers at once
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

STAGE = "drift_try"
ROLE = "drift_try"
EMBEDDINGS = "embeddings.parquet"


@dataclass(frozen=True)
class Scenario:
    name: str
    reference_run: str
    current_run: str
    drift_run: str


def latest_main_run() -> str:
    """The latest finished ``main`` run in any experiment of the tracking store."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`imgsearch.stage` = 'main' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise SystemExit("no finished `main` run in this tracking store: run `make demo` first")
    return str(runs[0].info.run_id)


def _subset_run(name: str, ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame) -> str:
    """A nested run holding ``embeddings.parquet`` and ``manifest.parquet`` of one subset."""
    import tempfile
    from pathlib import Path

    import mlflow

    from imgsearch import schema
    from imgsearch.embed.files import save_embeddings
    from steps.common import log_df, log_metrics
    from steps.runs import start_labelled_run

    with start_labelled_run("subset", name=f"subset {name}") as run:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_embeddings(Path(tmp) / EMBEDDINGS, ids, emb)
            mlflow.log_artifact(str(path))
        keep = manifest[manifest[schema.IMAGE_ID].astype(str).isin(set(ids.astype(str)))]
        log_df(keep, "manifest.parquet")
        log_metrics({"n": float(len(ids))})
        return str(run.info.run_id)


def _split(
    manifest: pd.DataFrame, ids: np.ndarray, column: str, value: str | None
) -> tuple[np.ndarray, str]:
    """``(mask of the new data among ids, the value used)``; clear errors for a wrong column."""
    import numpy as np

    from imgsearch import schema

    if column not in manifest.columns:
        known = ", ".join(sorted(str(c) for c in manifest.columns))
        raise SystemExit(f"the manifest has no column {column!r} (columns: {known})")
    by_id = dict(
        zip(manifest[schema.IMAGE_ID].astype(str), manifest[column].astype(str), strict=True)
    )
    values = np.array([by_id.get(str(i), "") for i in ids], dtype=object)
    counts = {v: int((values == v).sum()) for v in set(values) if v}
    if value is None:  # facebook in the demo; else the smallest group
        value = "facebook" if "facebook" in counts else min(counts, key=lambda v: (counts[v], v))
    if counts.get(value, 0) < 2 or len(values) - counts.get(value, 0) < 4:
        raise SystemExit(f"{column}={value!r}: too few images on one side ({counts})")
    return values == value, value


def run(
    main_run_id: str | None = None,
    column: str = "vendor",
    value: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    seed: int = 0,
    domain_column: str | None = None,
    domain_value: str | None = None,
) -> list[Scenario]:
    """The comparisons as nested runs of one ``drift_try`` run; returns them (new style, A/A,
    then the new domain when ``domain_column`` and ``domain_value`` are given)."""
    import mlflow
    import numpy as np

    from imgsearch.embed.files import load_embeddings
    from monitoring import drift
    from steps.common import artifact_path, read_df
    from steps.runs import labelled, start_labelled_run

    main_id = main_run_id or latest_main_run()
    tags = mlflow.get_run(main_id).data.tags
    extract_run, split_run = tags["imgsearch.run.extract"], tags["imgsearch.run.split"]
    ids, emb = load_embeddings(artifact_path(extract_run, EMBEDDINGS))
    manifest = read_df(split_run, "manifest.parquet")
    new, value = _split(manifest, ids, column, value)
    domain = np.zeros(len(ids), dtype=bool)
    if domain_column and domain_value:
        domain, _ = _split(manifest, ids, domain_column, domain_value)
    ref_pos, new_pos = np.flatnonzero(~new & ~domain), np.flatnonzero(new & ~domain)
    dom_pos = np.flatnonzero(~new & domain)
    rng = np.random.default_rng(seed)
    aa_pos = np.sort(rng.choice(ref_pos, size=min(len(new_pos), len(ref_pos) // 2), replace=False))
    rest_pos = np.setdiff1d(ref_pos, aa_pos)
    out: list[Scenario] = []
    with labelled(None, role=ROLE):
        started = start_labelled_run(STAGE)
    with started, labelled(None, role=ROLE):
        mlflow.set_tags({"imgsearch.input.main_run_id": main_id, "drift_try.split": column})
        mlflow.log_params({"column": column, "value": value, "seed": seed})
        plan = [
            (f"new style {column}={value}", ref_pos, new_pos),
            (f"A/A within {column}!={value}", rest_pos, aa_pos),
        ]
        if len(dom_pos):
            mlflow.log_params({"domain_column": domain_column, "domain_value": domain_value})
            plan.append((f"new domain {domain_column}={domain_value}", ref_pos, dom_pos))
        for name, ref, cur in plan:
            with labelled(name):
                ref_run = _subset_run("reference", ids[ref], emb[ref], manifest)
                cur_run = _subset_run("current", ids[cur], emb[cur], manifest)
                drift_run = drift.run(ref_run, cur_run, overrides, profile)
            out.append(Scenario(name, ref_run, cur_run, drift_run))
        mlflow.log_text(table(out), "drift_try.md")
    return out


def table(scenarios: list[Scenario]) -> str:
    """The verdicts side by side (markdown)."""
    import mlflow

    lines = [
        "| comparison | reference | new | score | threshold | effect | verdict | kind "
        "| kNN novel share | kNN distance ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        data = mlflow.get_run(s.drift_run).data
        m = data.metrics
        verdict = "drift" if m.get("drift_detected") else "no drift"
        nan = float("nan")
        lines.append(
            f"| {s.name} | {m.get('n_reference', 0):.0f} | {m.get('n_current', 0):.0f} | "
            f"{m.get('drift_score', nan):.4g} | {m.get('drift_threshold', nan):.4g} | "
            f"{m.get('drift_effect', nan):.3g} | {verdict} | "
            f"{data.tags.get('imgsearch.drift.kind', '?')} | "
            f"{m.get('knn_novel_share', nan):.2f} | {m.get('knn_distance_ratio', nan):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--main-run-id", default="", help="a main run (default: the latest)")
    parser.add_argument("--column", default="vendor", help="manifest column that splits the data")
    parser.add_argument(
        "--value", default="", help="its value for the new data (default: facebook)"
    )
    parser.add_argument(
        "--domain-column", default="", help="manifest column of a group held out as a new domain"
    )
    parser.add_argument("--domain-value", default="", help="its value, e.g. Flags for category")
    parser.add_argument("--report", default="", help="Evidently report: sample | full | none")
    parser.add_argument("--profile", default="", help="config profile (configs/profiles/NAME.yaml)")
    args = parser.parse_args(argv)
    from steps.common import setup_logging

    setup_logging()
    scenarios = run(
        args.main_run_id or None,
        args.column,
        args.value or None,
        overrides={"drift.report": args.report},
        profile=args.profile or None,
        domain_column=args.domain_column or None,
        domain_value=args.domain_value or None,
    )
    print(table(scenarios))
    for s in scenarios:
        print(f"{s.name}: drift run {s.drift_run} (drift/report.html, drift/clusters.csv)")


if __name__ == "__main__":
    main()
