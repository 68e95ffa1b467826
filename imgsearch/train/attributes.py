"""Train and score one head per catalog attribute: fit on train, tune on val, report on test.

Input: per-image feature sets (``{kind: (N, D)}``, rows in ``ids`` order; see
:mod:`imgsearch.embed.style`) and a manifest with ``image_id``, ``split`` and the attribute
columns. The split is by item by default, so test figures are about items no head saw.

For each attribute (``configs/attributes.yaml``): rows with an empty label are left out of that
attribute (counted in ``<name>_n_unlabelled``); the head (:class:`~imgsearch.models.attribute_heads.AttributeHead`)
is fitted on train with ``C`` chosen on val; test gets ``acc_at_1``, ``acc_at_3``, ``macro_f1``,
per-class recall and a confusion matrix (:mod:`imgsearch.evaluate.classification`), beside the
majority-class and kNN baselines on the same features (``<name>_majority_*``, ``<name>_knn_*``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate.classification import classification_scores, knn_scores, majority_scores
from imgsearch.models.attribute_heads import AttributeHead, HeadConfig, head_input

log = logging.getLogger(__name__)

_HEAD_DEFAULT_KEYS = ("model", "c_grid", "hidden", "max_iter", "seed", "class_weights", "k_grid")


@dataclass(frozen=True)
class AttributesConfig:
    """``attributes``: name -> head settings (``column``, ``features``, and any of the defaults
    below to override them for that head)."""

    attributes: dict[str, Any] = field(default_factory=dict)
    model: str = "linear"
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    hidden: tuple[int, ...] = (256,)
    max_iter: int = 2000
    seed: int = 0
    class_weights: tuple[str, ...] = ("balanced",)
    k_grid: tuple[int, ...] = (5, 10, 20, 40)
    gram_blocks: tuple[int, ...] = (3, 6, 10)
    knn_k: int = 10
    ks: tuple[int, ...] = (1, 3)
    batch_size: int = 64

    def heads(self) -> dict[str, HeadConfig]:
        if not self.attributes:
            raise ConfigError("attributes: no attribute configured")
        defaults = {k: getattr(self, k) for k in _HEAD_DEFAULT_KEYS}
        out = {}
        for name, spec in self.attributes.items():
            spec = {"column": name} if spec is None else dict(spec)
            spec.setdefault("column", name)
            out[str(name)] = HeadConfig.from_mapping(spec, defaults)
        return out

    def feature_kinds(self) -> list[str]:
        """Every feature set some head reads, in a stable order."""
        kinds = {k for h in self.heads().values() for k in h.features}
        return [k for k in ("embedding", "pooled", "gram") if k in kinds]


@dataclass
class AttributeReport:
    name: str
    head: AttributeHead
    metrics: dict[str, float]
    per_class: pd.DataFrame
    confusion: np.ndarray
    labels: list[str]
    predictions: pd.DataFrame  # test rows: image_id, true, top-3 predictions with probabilities


@dataclass
class AttributesResult:
    reports: dict[str, AttributeReport]
    metrics: dict[str, float]

    @property
    def heads(self) -> dict[str, AttributeHead]:
        return {name: r.head for name, r in self.reports.items()}


def _labels(manifest: pd.DataFrame, ids: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(label per row as str or "", split per row)`` in ``ids`` order."""
    rows = manifest.astype({schema.IMAGE_ID: str}).drop_duplicates(schema.IMAGE_ID)
    rows = rows.set_index(schema.IMAGE_ID).reindex([str(i) for i in ids])
    if column not in rows.columns:
        raise ConfigError(
            f"attribute column {column!r} is not in the manifest ({sorted(rows.columns)})"
        )
    labels = rows[column].map(
        lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
    )
    return labels.to_numpy(dtype=object), rows[schema.SPLIT].fillna("").to_numpy(dtype=object)


def _predictions(
    ids: np.ndarray, y: np.ndarray, proba: np.ndarray, classes: np.ndarray, k: int
) -> pd.DataFrame:
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    out = pd.DataFrame({schema.IMAGE_ID: ids, "true": y})
    for r in range(order.shape[1]):
        out[f"pred_{r + 1}"] = classes[order[:, r]]
        out[f"proba_{r + 1}"] = proba[np.arange(len(proba)), order[:, r]]
    out["correct"] = out["pred_1"] == out["true"]
    return out


def train_one(
    name: str,
    cfg: HeadConfig,
    x: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    ids: np.ndarray,
    knn_k: int = 10,
    ks: Sequence[int] = (1, 3),
) -> AttributeReport:
    """Fit, tune and score the head of one attribute (see the module docstring)."""
    has = labels != ""
    tr, va, te = (has & (split == s) for s in ("train", "val", "test"))
    if not te.any():
        raise ConfigError(f"attribute {name!r}: no labelled test rows to report on")
    head = AttributeHead(name, cfg).fit(x[tr], labels[tr], x[va], labels[va])
    classes = head.classes_
    proba = head.predict_proba(x[te])
    metrics, per_class, confusion, present = classification_scores(labels[te], proba, classes, ks)
    majority, maj_classes = majority_scores(labels[tr], int(te.sum()))
    knn, knn_classes = knn_scores(x[tr], labels[tr], x[te], knn_k)
    for prefix, (scores, cls) in (
        ("majority_", (majority, maj_classes)),
        ("knn_", (knn, knn_classes)),
    ):
        base, *_ = classification_scores(labels[te], scores, cls, ks)
        metrics.update(
            {f"{prefix}{k}": v for k, v in base.items() if k.startswith(("acc_", "macro"))}
        )
    counts = pd.Series(labels[tr]).value_counts()
    metrics.update(
        {
            "c": float(head.c_ or 0.0),  # k for a knn head
            "class_weight_balanced": float(head.class_weight_ == "balanced"),
            "val_acc_at_1": float(head.val_accuracy_.get(head.c_ or -1.0, np.nan)),
            "n_train": float(tr.sum()),
            "n_val": float(va.sum()),
            "n_unlabelled": float((~has).sum()),
            "train_classes": float(len(counts)),
            "train_imbalance": float(counts.max() / counts.min()),
        }
    )
    preds = _predictions(ids[te], labels[te], proba, classes, max(ks))
    return AttributeReport(name, head, metrics, per_class, confusion, present, preds)


def train_attributes(
    ids: Sequence[str],
    features: Mapping[str, np.ndarray],
    manifest: pd.DataFrame,
    cfg: AttributesConfig,
) -> AttributesResult:
    """One :class:`AttributeReport` per configured attribute; ``metrics`` flattens them as
    ``<name>_<metric>``. Raises :class:`ConfigError` for a missing column or split."""
    if schema.SPLIT not in manifest.columns:
        raise ConfigError("the manifest has no split column: run split first")
    id_arr = np.asarray([str(i) for i in ids], dtype=object)
    reports: dict[str, AttributeReport] = {}
    metrics: dict[str, float] = {}
    for name, head_cfg in cfg.heads().items():
        labels, split = _labels(manifest, id_arr, head_cfg.column)
        x = head_input(features, head_cfg.features)
        report = train_one(name, head_cfg, x, labels, split, id_arr, cfg.knn_k, cfg.ks)
        reports[name] = report
        metrics.update({f"{name}_{k}": v for k, v in report.metrics.items()})
        log.info(
            "attribute %s (%s): test acc@1 %.3f acc@3 %.3f (majority %.3f, kNN %.3f)",
            name,
            "+".join(head_cfg.features),
            report.metrics["acc_at_1"],
            report.metrics.get("acc_at_3", np.nan),
            report.metrics["majority_acc_at_1"],
            report.metrics["knn_acc_at_1"],
        )
    return AttributesResult(reports, metrics)
