"""Zero-shot check for restricted content in images that have no words of their own.

An image's score is its highest cosine similarity to the restricted terms embedded into the image
space by the aligned text encoder. The threshold is calibrated on ``val`` (the highest threshold
whose recall of the known restricted items reaches ``target_recall``; ground truth = items whose
texts match the restricted-words policy), then precision and recall are measured on ``test``.
Flagged images can be left out of text-search results (``search.exclude_flagged``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve

from imgsearch.errors import ConfigError
from imgsearch.evaluate.metrics import l2_normalise


@dataclass(frozen=True)
class FlagCalibration:
    threshold: float
    target_recall: float
    val_precision: float
    val_recall: float


def restricted_scores(emb: np.ndarray, term_emb: np.ndarray) -> np.ndarray:
    """``(N,)`` max cosine similarity of each image to any restricted term."""
    if len(term_emb) == 0:
        raise ConfigError("no restricted terms to score images against")
    x = l2_normalise(np.asarray(emb, dtype=np.float32))
    t = l2_normalise(np.asarray(term_emb, dtype=np.float32))
    return (x @ t.T).max(axis=1)


def calibrate(scores: np.ndarray, truth: np.ndarray, target_recall: float = 0.8) -> FlagCalibration:
    """The highest threshold reaching ``target_recall`` on these (val) scores."""
    truth = np.asarray(truth, dtype=bool)
    if not truth.any() or truth.all():
        raise ConfigError("calibration needs both restricted and other images in the val split")
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    ok = np.flatnonzero(recall[:-1] >= target_recall)
    i = int(ok[-1]) if len(ok) else 0
    return FlagCalibration(
        float(thresholds[i]), target_recall, float(precision[i]), float(recall[i])
    )


def flag_quality(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and counts of ``scores >= threshold`` against ``truth``."""
    flagged = np.asarray(scores) >= threshold
    truth = np.asarray(truth, dtype=bool)
    tp = int((flagged & truth).sum())
    return {
        "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
        "recall": tp / int(truth.sum()) if truth.any() else float("nan"),
        "n_flagged": float(flagged.sum()),
        "n_restricted": float(truth.sum()),
        "n_images": float(len(truth)),
    }
