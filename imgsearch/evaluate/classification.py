"""Classification scores of an attribute head: acc@1, acc@k, macro-F1, per-class recall, confusion.

Every score comes from scikit-learn (``top_k_accuracy_score``, ``f1_score``, ``recall_score``,
``confusion_matrix``). A test label the head never saw in training counts as a miss: its score
column is added with probability 0 (so it can never be in the top k), never dropped.

Baselines, so a head's figures mean something: the majority class of the train split (the same
ranking for every image: the train classes by frequency) and a cosine kNN on the same features
(``k`` nearest train images, their labels' vote shares as scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, recall_score, top_k_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from imgsearch.errors import ConfigError

#: labels or classes: a list or a 1-D array
Labels = Sequence[Any] | np.ndarray


def align_scores(
    y_true: Labels, scores: np.ndarray, classes: Labels
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(y_true as str, scores with a 0 column per unseen test label, all labels)``, the labels
    (and score columns) sorted."""
    y = np.asarray(y_true).astype(str)
    labels = [str(c) for c in classes]
    if scores.shape != (len(y), len(labels)):
        raise ConfigError(
            f"scores {scores.shape} do not match {len(y)} rows x {len(labels)} classes"
        )
    unseen = sorted(set(y) - set(labels))
    if unseen:
        scores = np.hstack([scores, np.zeros((len(y), len(unseen)), dtype=scores.dtype)])
        labels = labels + unseen
    order = np.argsort(
        np.asarray(labels, dtype=object), kind="stable"
    )  # scikit-learn wants them sorted
    return y, scores[:, order], [labels[i] for i in order]


def top_k_accuracy(y_true: Labels, scores: np.ndarray, classes: Labels, k: int) -> float:
    """Share of rows whose true label is among the ``k`` best-scored classes (scikit-learn)."""
    y, s, labels = align_scores(y_true, scores, classes)
    if k >= len(labels):  # every label is in the top k
        return 1.0
    if len(labels) == 2:  # k == 1 here; scikit-learn's binary form wants one score column
        return float(np.mean(np.asarray(labels)[s.argmax(axis=1)] == y))
    return float(top_k_accuracy_score(y, s, k=min(k, len(labels)), labels=labels))


def classification_scores(
    y_true: Labels, scores: np.ndarray, classes: Labels, ks: Sequence[int] = (1, 3)
) -> tuple[dict[str, float], pd.DataFrame, np.ndarray, list[str]]:
    """``(metrics, per_class, confusion, labels)``.

    ``metrics``: ``acc_at_<k>`` for each k, ``macro_f1``, ``n``, ``n_classes``, ``n_unseen``
    (test rows whose label train never had). ``per_class``: ``label``, ``support``, ``recall``,
    ``predicted``. ``confusion``: rows true, columns predicted, in ``labels`` order.
    """
    y, s, labels = align_scores(y_true, scores, classes)
    if len(y) == 0:
        raise ConfigError("no rows to score")
    pred = np.asarray(labels)[s.argmax(axis=1)]
    metrics: dict[str, float] = {f"acc_at_{k}": top_k_accuracy(y, s, labels, k) for k in ks}
    metrics["macro_f1"] = float(
        f1_score(y, pred, labels=sorted(set(y)), average="macro", zero_division=0)
    )
    metrics["n"] = float(len(y))
    metrics["n_classes"] = float(len(set(y)))
    metrics["n_unseen"] = float(np.sum(~np.isin(y, [str(c) for c in classes])))
    present = sorted(set(y) | set(pred))
    recall = recall_score(y, pred, labels=present, average=None, zero_division=0)
    per_class = pd.DataFrame(
        {
            "label": present,
            "support": [int(np.sum(y == c)) for c in present],
            "recall": recall,
            "predicted": [int(np.sum(pred == c)) for c in present],
        }
    ).sort_values(["support", "label"], ascending=[False, True], ignore_index=True)
    confusion = confusion_matrix(y, pred, labels=present)
    return metrics, per_class, confusion, present


def majority_scores(y_train: Labels, n: int) -> tuple[np.ndarray, list[str]]:
    """Scores of the majority baseline: every row ranks the train classes by their frequency."""
    labels, counts = np.unique(np.asarray(y_train).astype(str), return_counts=True)
    share = (counts / counts.sum()).astype(np.float64)
    return np.tile(share, (n, 1)), [str(c) for c in labels]


def knn_scores(
    x_train: np.ndarray, y_train: Labels, x: np.ndarray, k: int = 10
) -> tuple[np.ndarray, list[str]]:
    """Scores of the cosine kNN baseline (scikit-learn, distance-weighted vote of ``k`` neighbours)."""
    knn = KNeighborsClassifier(
        n_neighbors=min(k, len(x_train)), metric="cosine", weights="distance", algorithm="brute"
    )
    knn.fit(x_train, np.asarray(y_train).astype(str))
    return np.asarray(knn.predict_proba(x)), [str(c) for c in knn.classes_]


def confusion_plot(
    confusion: np.ndarray, labels: Sequence[str], path: Path, title: str, max_labels: int = 40
) -> Path:
    """A row-normalised confusion-matrix heat map (matplotlib, Agg). With more than
    ``max_labels`` labels only the most frequent true labels are shown (rows and columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    names = list(labels)
    if len(names) > max_labels:
        keep = np.sort(np.argsort(-cm.sum(axis=1), kind="stable")[:max_labels])
        cm, names = cm[np.ix_(keep, keep)], [names[i] for i in keep]
        title = f"{title} ({max_labels} most frequent of {len(labels)})"
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(5.0, 0.25 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=110)
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
