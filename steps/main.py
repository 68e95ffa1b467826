"""The whole pipeline, each stage a nested MLflow run under this one.

ingest -> validate -> preprocess -> eda -> split -> extract -> index -> evaluate -> align ->
register -> promote, then, unless ``--no-finetune``: finetune (from the baseline extractor, on
train, early-stopped on val) -> extract -> index -> evaluate -> align -> register -> promote.
``align`` (text search) runs when the catalog has item texts (``configs/align.yaml``). The gate promotes the fine-tuned
models only when they match or beat the baseline on the frozen test split.

Inputs: the catalog named by configs/ingest.yaml (default: the emoji demo catalog, fetched when
absent). Each stage reads the previous stages' artifacts by run id; the parent run records every
child's run id as a tag ``imgsearch.run.<stage>`` and the headline metrics of the evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from steps import eda, finetune, ingest, preprocess, split, validate
from steps.chain import Chain, ChainNames, run_chain
from steps.common import HEADLINE, Option, cli, log_df, log_metrics

log = logging.getLogger(__name__)


def run(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    promote_: bool = True,
    finetune_: bool = True,
) -> str:
    kw: dict[str, Any] = {"overrides": overrides or {}, "profile": profile or None}
    with mlflow.start_run(run_name="main", nested=mlflow.active_run() is not None) as parent:
        mlflow.set_tag("imgsearch.stage", "main")
        mlflow.log_params({k: v for k, v in (overrides or {}).items() if v not in (None, "")})
        ids: dict[str, str] = {}

        def done(stage: str, run_id: str) -> str:
            ids[stage] = run_id
            mlflow.set_tag(f"imgsearch.run.{stage}", run_id)
            log.info("stage %s: run %s", stage, run_id)
            return run_id

        done("ingest", ingest.run(**kw))
        done("validate", validate.run(ids["ingest"], **kw))
        done("preprocess", preprocess.run(ids["validate"], **kw))
        done("eda", eda.run(ids["validate"], ids["preprocess"], **kw))
        done("split", split.run(preprocess_run_id=ids["preprocess"], **kw))

        def retrieval(prefix: str, extractor_uri: str | None) -> None:
            """extract -> index -> evaluate -> register (-> promote) with one extractor."""
            runs = run_chain(
                Chain(kw, done, names=ChainNames.prefixed(prefix)),
                data_run_id=ids["split"],
                eval_split_run_id=ids["split"],
                preprocess_run_id=ids["preprocess"],
                extractor_uri=extractor_uri,
                texts_run_id=ids["ingest"],
                do_promote=promote_,
            )
            metrics = mlflow.get_run(runs.evaluate).data.metrics
            log_metrics({f"{prefix}test.{k}": metrics[k] for k in HEADLINE if k in metrics})

        retrieval("", None)
        if finetune_:
            ft = done(
                "finetune",
                finetune.run(
                    ids["split"],
                    preprocess_run_id=ids["preprocess"],
                    extractor_uri=f"runs:/{ids['extract']}/extractor",
                    **kw,
                ),
            )
            retrieval("finetuned.", f"runs:/{ft}/extractor")
            table = before_after(ids["evaluate"], ids["finetuned.evaluate"])
            log_df(table, "before_after.parquet")
            # the same table readable in the MLflow UI's artifact viewer
            mlflow.log_text(table.to_csv(index=False, float_format="%.4f"), "before_after.csv")
        return parent.info.run_id


def before_after(baseline_run_id: str, finetuned_run_id: str) -> pd.DataFrame:
    """Every test metric of the two evaluate runs side by side, with the change and the ratio."""
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
        for name in sorted(set(before) & set(after))
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


def _switches(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    kwargs["promote_"] = not kwargs.pop("no_promote")
    finetune_ = str(kwargs.pop("finetune")).strip().lower()
    kwargs["finetune_"] = finetune_ not in ("false", "0", "no", "off")


def main() -> None:
    cli(run, __doc__, OPTIONS, adjust=_switches)


if __name__ == "__main__":
    main()
