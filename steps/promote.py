"""Promotion gate: move ``champion`` to the ``challenger`` pair when it strictly beats it.

Inputs: the registry (``imgsearch-index@challenger`` and its extractor version), thresholds from
``configs/promote.yaml`` (``--metric``, ``--min-delta`` override them). The gate trusts a
version's figure only when it equals the metric of the evaluate run that measured that version's
own runs on the same frozen test split, and promotes only on ``challenger - champion >
min_delta`` (default 1e-4: a tie never promotes). After a promotion ``challenger`` is removed and
``previous`` names the old champion; see :mod:`registry.promote` for the alias rules. ``--rollback`` instead
re-points ``champion`` at the previous champion (or ``--to-version``).

Produces: tags ``promote.promoted`` / ``promote.reason`` / versions, metrics
``promote.challenger_value`` / ``promote.champion_value`` / ``promote.delta`` / ``promote.promoted``
and ``decision.json``. A refused promotion is a normal outcome (exit 0); an unreachable or locked
store fails the step, with nothing changed.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from imgsearch.config import from_dict
from registry.promote import PromoteConfig, promote_with_config, rollback
from steps.common import Option, cli, log_metrics, stage_run

log = logging.getLogger(__name__)


def run(
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    do_rollback: bool = False,
    to_version: str | None = None,
) -> str:
    with stage_run("promote", overrides, profile) as (active, all_cfg):
        cfg = from_dict(PromoteConfig, all_cfg.get("promote"))
        if do_rollback:
            result = rollback(
                to_version=to_version or None,
                index_name=cfg.index_name,
                extractor_name=cfg.extractor_name,
            )
            mlflow.set_tags(
                {
                    "promote.action": "rollback",
                    "promote.from_version": result.from_version,
                    "promote.to_version": result.to_version,
                    "promote.reason": result.reason,
                }
            )
            mlflow.log_dict(result.__dict__, "decision.json")
            return active.info.run_id
        decision = promote_with_config(cfg)
        mlflow.set_tags(
            {
                "promote.action": "promote",
                "promote.promoted": str(decision.promoted).lower(),
                "promote.reason": decision.reason[:5000],
                "promote.challenger_version": str(decision.challenger_version),
                "promote.champion_version": str(decision.champion_version),
                "promote.extractor_version": str(decision.extractor_version),
            }
        )
        log_metrics(
            {
                "promote.promoted": float(decision.promoted),
                "promote.challenger_value": decision.challenger_value,
                "promote.champion_value": decision.champion_value,
                "promote.delta": decision.delta,
                **{f"promote.smoke.{k}": v for k, v in decision.smoke.items()},
            }
        )
        mlflow.log_dict(decision.as_dict(), "decision.json")
        log.info("promotion %s: %s", "done" if decision.promoted else "refused", decision.reason)
        return active.info.run_id


OPTIONS = (
    Option("--metric", "version metric to compare (default: config)", key="promote.metric"),
    Option("--min-delta", "required improvement (default: config)", key="promote.min_delta"),
    Option("--rollback", "roll champion back instead", flag_only=True),
    Option("--to-version", "with --rollback: the index version"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS, adjust=_rollback_keywords)


def _rollback_keywords(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    kwargs["do_rollback"] = kwargs.pop("rollback")


if __name__ == "__main__":
    main()
