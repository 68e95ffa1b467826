"""The whole pipeline, each stage a nested MLflow run under this one.

ingest -> validate -> preprocess -> eda -> split -> extract -> index -> evaluate -> align ->
register -> promote, then, unless ``--no-finetune``: finetune (from the baseline extractor, on
train, early-stopped on val) -> extract -> index -> evaluate -> align -> register -> promote.
With fine-tuning, the baseline extract also logs ``trunk/`` (the frozen blocks' outputs,
:mod:`imgsearch.embed.trunk`), handed to finetune and the second extract as
``runs:/<extract run>/trunk``: they skip those blocks when the frozen part's fingerprint matches
(the second extract takes the Gram features of ``extras/`` from the baseline's run too).
``align`` (text search) runs when the catalog has item texts (``configs/align.yaml``). The gate promotes the fine-tuned
models only when they match or beat the baseline on the frozen test split.

Inputs: the catalog named by configs/ingest.yaml (default: the emoji demo catalog, fetched when
absent). Each stage reads the previous stages' artifacts by run id; the parent run records every
child's run id as a tag ``imgsearch.run.<stage>`` and the headline metrics of the evaluation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import mlflow
import pandas as pd

from imgsearch.config import load_config
from steps import attributes, categorize, eda, finetune, ingest, preprocess, split, validate
from steps.chain import Chain, ChainNames, run_chain
from steps.common import (
    HEADLINE,
    PROFILE_ENV,
    Option,
    cli,
    log_df,
    log_metrics,
    log_settings,
)
from steps.runs import announce, labelled, start_labelled_run
from steps.summary import (
    closing_summary,
    description,
    effective_params,
    figures_table,
    gate_line,
    ordered_metrics,
)

log = logging.getLogger(__name__)

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI


def run(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    promote_: bool = True,
    finetune_: bool = True,
) -> str:
    profile = profile or os.environ.get(PROFILE_ENV) or None
    kw: dict[str, Any] = {"overrides": overrides or {}, "profile": profile}
    params = effective_params(load_config(profile, overrides), profile, finetune_, promote_)
    backbone = params["backbone"]
    with labelled(f"{backbone} ({profile})" if profile else backbone):
        started = start_labelled_run("main")
    with started as parent:
        # the switches spelt as on the command line (-P finetune=false): one param, not two
        log_settings({**params, "finetune": _switch(finetune_), "promote": _switch(promote_)})
        mlflow.set_tag(NOTE_TAG, description(params))
        ids: dict[str, str] = {}
        gates: list[str] = []

        def done(stage: str, run_id: str) -> str:
            ids[stage] = run_id
            mlflow.set_tag(f"imgsearch.run.{stage}", run_id)
            log.info("stage %s: run %s", stage, run_id)
            return run_id

        # the data stages serve both models: named by their stage only
        done("ingest", ingest.run(**kw))
        done("validate", validate.run(ids["ingest"], **kw))
        done("preprocess", preprocess.run(ids["validate"], **kw))
        done("eda", eda.run(ids["validate"], ids["preprocess"], **kw))
        done("split", split.run(preprocess_run_id=ids["preprocess"], **kw))

        def retrieval(
            prefix: str, extractor_uri: str | None, trunk_uri: str | None = None
        ) -> dict[str, float]:
            """extract -> index -> evaluate -> register (-> promote) with one extractor."""
            runs = run_chain(
                Chain(kw, done, names=ChainNames.prefixed(prefix)),
                data_run_id=ids["split"],
                eval_split_run_id=ids["split"],
                preprocess_run_id=ids["preprocess"],
                extractor_uri=extractor_uri,
                texts_run_id=ids["ingest"],
                do_promote=promote_,
                trunk_uri=trunk_uri,
                write_trunk=finetune_ and not prefix,
            )
            metrics = mlflow.get_run(runs.evaluate).data.metrics
            log_metrics({f"{prefix}test.{k}": metrics[k] for k in HEADLINE if k in metrics})
            gates.append(gate_line(runs.promote))
            return metrics

        with labelled(f"baseline {backbone}", role="baseline"):
            # its extras (same forward pass as the trunk) give the re-extraction the Gram features
            before = retrieval("", None)
        after: dict[str, float] | None = None
        if finetune_:
            with labelled(f"finetuned {backbone}", role="finetuned"):
                trunk = _trunk_uri(ids["extract"])
                ft = done(
                    "finetune",
                    finetune.run(
                        ids["split"],
                        preprocess_run_id=ids["preprocess"],
                        extractor_uri=f"runs:/{ids['extract']}/extractor",
                        trunk_uri=trunk,
                        **kw,
                    ),
                )
                after = retrieval("finetuned.", f"runs:/{ft}/extractor", trunk)
            table = before_after(ids["evaluate"], ids["finetuned.evaluate"])
            log_df(table, "before_after.parquet")
            # the same table readable in the MLflow UI's artifact viewer
            mlflow.log_text(table.to_csv(index=False, float_format="%.4f"), "before_after.csv")
        final = "finetuned." if after is not None else ""
        for stage, step in (("categorize", _categorize), ("attributes", _attributes)):
            run_id = step(ids, final, kw)
            if run_id:
                done(stage, run_id)
        figures = figures_table(before, after)
        mlflow.set_tag(NOTE_TAG, description(params, figures))
        summary = closing_summary(parent.info.run_id, figures, gates, _reports(ids, finetune_))
        mlflow.log_text(summary, "summary.md")
        announce("done")
        print(summary, flush=True)
        return parent.info.run_id


def _trunk_uri(extract_run_id: str) -> str | None:
    """``runs:/<id>/trunk`` when the baseline extraction wrote the frozen blocks' outputs
    (:mod:`imgsearch.embed.trunk`): fine-tuning and the re-extraction then skip those blocks."""
    tags = mlflow.get_run(extract_run_id).data.tags
    return f"runs:/{extract_run_id}/trunk" if tags.get("imgsearch.trunk.written") else None


def _categorize(ids: dict[str, str], prefix: str, kw: dict[str, Any]) -> str | None:
    """The whole collection sorted into named clusters with the final extractor (its align run's
    zero-shot keywords name them; the catalog's tags only measure them). ``None`` when
    ``categorize.in_main`` is off."""
    cfg = load_config(kw["profile"], kw["overrides"]).get("categorize") or {}
    if not cfg.get("in_main", True):
        return None
    with labelled(f"collection ({prefix.rstrip('.') or 'baseline'})"):
        return categorize.run(
            ids[f"{prefix}extract"],
            keywords_run_id=ids.get(f"{prefix}align"),
            texts_run_id=ids["ingest"],
            **kw,
        )


def _attributes(ids: dict[str, str], prefix: str, kw: dict[str, Any]) -> str | None:
    """Attribute heads on the final extractor (:func:`steps.attributes.run_if_configured`)."""
    with labelled(f"{prefix.rstrip('.') or 'baseline'} extractor"):
        return attributes.run_if_configured(ids[f"{prefix}extract"], ids["split"], **kw)


def _reports(ids: dict[str, str], finetuned: bool) -> dict[str, str]:
    """Where a reviewer finds each report (run id and artifact)."""
    out = {
        "EDA report": f"run {ids['eda']}: eda/report.html",
        "quarantined files": f"run {ids['validate']}: quarantine.csv",
        "baseline evaluation": f"run {ids['evaluate']}: report.html, per_category.csv, plots/",
    }
    if finetuned:
        out["fine-tuned evaluation"] = (
            f"run {ids['finetuned.evaluate']}: report.html, per_category.csv, plots/"
        )
        out["before / after"] = "this run: before_after.csv"
    if "categorize" in ids:
        out["categories of the collection"] = (
            f"run {ids['categorize']}: gallery/categories.html, categories.csv"
        )
    if "attributes" in ids:
        out["attribute heads"] = f"run {ids['attributes']}: summary.csv, plots/confusion_*.png"
    return out


def before_after(baseline_run_id: str, finetuned_run_id: str) -> pd.DataFrame:
    """Every test metric of the two evaluate runs side by side, with the change and the ratio;
    the headline metrics first (map_at_r, hit_at_1, hit_at_10, map)."""
    before = mlflow.get_run(baseline_run_id).data.metrics
    after = mlflow.get_run(finetuned_run_id).data.metrics
    rows = [
        {
            "metric": name,
            "baseline": before[name],
            "finetuned": after[name],
            "delta": after[name] - before[name],
            "ratio": after[name] / before[name] if before[name] else float("nan"),
        }
        for name in ordered_metrics(sorted(set(before) & set(after)))
    ]
    return pd.DataFrame(rows, columns=["metric", "baseline", "finetuned", "delta", "ratio"])


OPTIONS = (
    Option("--limit", "demo: number of emoji (default: all)", key="demo.limit"),
    Option(
        "--backbone",
        "resnet50 | mobilenet_v2 | efficientnet_b0 | efficientnet_lite0",
        key="extract.backbone",
    ),
    Option("--weights", "imagenet | none | checkpoint path", key="extract.weights"),
    Option("--factory", "FAISS index factory string, or auto", key="index.factory"),
    Option("--no-promote", "register the challenger only", flag_only=True),
    Option(
        "--finetune",
        "true | false: fine-tune after the baseline",
        default="true",
        empty_is_none=False,
    ),
)


def _switch(on: bool) -> str:
    return "true" if on else "false"


def _switches(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    kwargs["promote_"] = not kwargs.pop("no_promote")
    finetune_ = str(kwargs.pop("finetune")).strip().lower()
    kwargs["finetune_"] = finetune_ not in ("false", "0", "no", "off")


def main() -> None:
    cli(run, __doc__, OPTIONS, adjust=_switches)


if __name__ == "__main__":
    main()
