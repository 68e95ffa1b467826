"""Attribute heads: one scikit-learn classifier per catalog attribute, on frozen features.

A head (:class:`AttributeHead`, scikit-learn style: ``fit`` returns self, learned attributes end
in ``_``) is ``StandardScaler -> LogisticRegression(class_weight="balanced")`` by default (fast,
calibrated probabilities), ``StandardScaler -> MLPClassifier`` (``model: mlp``), or a cosine,
distance-weighted ``KNeighborsClassifier`` (``model: knn``). Its settings are fitted on the train
split and chosen on the val split: each ``C`` of ``c_grid`` (the MLP's L2 penalty is
``alpha = 1 / C``; for the linear head, each ``C`` with each ``class_weight`` of
``class_weights``, ``balanced`` or ``none``) or each ``k`` of ``k_grid`` is fitted on train, the
one with the best val accuracy@1 wins (ties: the first, i.e. the smaller, more regularised
``C``, ``balanced`` before ``none``, the smaller ``k``), and the head is that fit.

A head reads the feature sets its :class:`HeadConfig` names (``embedding``: the extractor's
output; ``pooled`` / ``gram``: see :mod:`imgsearch.embed.style`), each L2-normalised and then
concatenated (:func:`head_input`), so one head can read the retrieval embedding and another
the style statistics a retrieval embedding was trained to ignore.

Heads are saved with :mod:`skops.io` (never a plain pickle): :func:`load_heads` refuses a file
holding any type outside scikit-learn and numpy (``UntrustedModelError``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from imgsearch.errors import ConfigError, ImgsearchError

log = logging.getLogger(__name__)

HEAD_MODELS = ("linear", "mlp", "knn")
CLASS_WEIGHTS = ("balanced", "none")
FEATURE_KINDS = ("embedding", "pooled", "gram")
HEADS_FILE = "heads.json"
_TRUSTED_MODULES = ("sklearn.", "numpy.", "builtins.")


class UntrustedModelError(ImgsearchError):
    """A saved head holds a type that is not scikit-learn's or numpy's: refused, never loaded."""


@dataclass(frozen=True)
class HeadConfig:
    """One attribute: the manifest ``column`` it predicts, the feature sets it reads, its model."""

    column: str
    features: tuple[str, ...] = ("embedding",)
    model: str = "linear"
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    hidden: tuple[int, ...] = (256,)  # MLP hidden widths
    max_iter: int = 2000
    seed: int = 0
    class_weights: tuple[str, ...] = ("balanced",)  # linear: each tried with each C, chosen on val
    k_grid: tuple[int, ...] = (5, 10, 20, 40)  # knn: neighbours, chosen on val

    def __post_init__(self) -> None:
        if self.model not in HEAD_MODELS:
            raise ConfigError(f"head model {self.model!r} is not one of {HEAD_MODELS}")
        unknown = sorted(set(self.features) - set(FEATURE_KINDS))
        if unknown or not self.features:
            raise ConfigError(f"head features {list(self.features)}: use some of {FEATURE_KINDS}")
        if not self.c_grid or any(float(c) <= 0 for c in self.c_grid):
            raise ConfigError(f"c_grid must be positive numbers, got {list(self.c_grid)}")
        bad = sorted(set(self.class_weights) - set(CLASS_WEIGHTS))
        if bad or not self.class_weights:
            raise ConfigError(
                f"class_weights {list(self.class_weights)}: use some of {CLASS_WEIGHTS}"
            )
        if not self.k_grid or any(int(k) < 1 for k in self.k_grid):
            raise ConfigError(f"k_grid must be positive integers, got {list(self.k_grid)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], defaults: Mapping[str, Any]) -> HeadConfig:
        merged = {**dict(defaults), **dict(data)}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"attribute head: unknown keys {unknown}; known: {sorted(known)}")
        for key in ("features", "c_grid", "hidden", "class_weights", "k_grid"):
            if key in merged:
                value = merged[key]
                merged[key] = tuple([value] if isinstance(value, str | int | float) else value)
        return cls(**merged)


def head_input(features: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The named feature sets, each L2-normalised per row, concatenated -> ``(N, sum D)`` float32.

    Raises :class:`ConfigError` when a named set is missing or the sets differ in rows.
    """
    missing = [n for n in names if n not in features]
    if missing:
        raise ConfigError(f"feature sets {missing} were not computed (have {sorted(features)})")
    rows = {len(features[n]) for n in names}
    if len(rows) != 1:
        raise ConfigError(f"feature sets {list(names)} have different row counts {sorted(rows)}")
    parts = []
    for name in names:
        x = np.asarray(features[name], dtype=np.float32)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        parts.append(x / np.maximum(norm, 1e-12))
    return np.concatenate(parts, axis=1)


def _estimator(cfg: HeadConfig, c: float, class_weight: str = "balanced") -> Pipeline:
    """The pipeline of one setting: ``c`` is ``C`` (linear), ``1 / alpha`` (mlp) or ``k`` (knn)."""
    if cfg.model == "knn":  # on the L2-normalised sets as they are: scaling would change cosine
        return make_pipeline(
            KNeighborsClassifier(
                n_neighbors=int(c), metric="cosine", weights="distance", algorithm="brute"
            )
        )
    if cfg.model == "linear":
        model: Any = LogisticRegression(
            C=c,
            class_weight=None if class_weight == "none" else class_weight,
            max_iter=cfg.max_iter,
            random_state=cfg.seed,
        )
    else:  # MLPClassifier has no class_weight: balanced by the loss would need sample weights
        model = MLPClassifier(
            hidden_layer_sizes=cfg.hidden,
            alpha=1.0 / c,
            max_iter=cfg.max_iter,
            early_stopping=False,
            random_state=cfg.seed,
        )
    return make_pipeline(StandardScaler(), model)


def _c_path(
    cfg: HeadConfig, path: Sequence[float], weight: str, xs: np.ndarray, y: np.ndarray
) -> list[LogisticRegression]:
    """One class weighting's models along ``path`` (ascending ``C``), each fit starting from the
    previous ``C``'s solution."""
    model = _estimator(cfg, path[0], weight)[-1].set_params(warm_start=True)
    out = []
    for c in path:
        model.set_params(C=c).fit(xs, y)
        out.append(copy.deepcopy(model).set_params(warm_start=False))
    return out


def _fits(
    cfg: HeadConfig, grid: Sequence[tuple[float, str]], x: np.ndarray, y: np.ndarray
) -> list[tuple[float, str, Pipeline]]:
    """Each setting of ``grid`` fitted on ``(x, y)``, in grid order. The linear head walks each
    class weighting's ``C`` path upwards from the previous ``C``'s solution (the scaler is fitted
    once; the problem is convex, so a warm start changes the iterations, not the optimum within
    the solver's tolerance), the weightings' paths in parallel threads."""
    if cfg.model != "linear":
        return [(c, w, _estimator(cfg, c, w).fit(x, y)) for c, w in grid]
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    weights = list(dict.fromkeys(w for _, w in grid))
    paths = {w: sorted({c for c, v in grid if v == w}) for w in weights}
    fitted = Parallel(n_jobs=min(len(weights), os.cpu_count() or 1), prefer="threads")(
        delayed(_c_path)(cfg, paths[w], w, xs, y) for w in weights
    )
    models = {
        (c, w): m
        for w, path_models in zip(weights, fitted, strict=True)
        for c, m in zip(paths[w], path_models, strict=True)
    }
    return [
        (c, w, Pipeline([("standardscaler", scaler), ("logisticregression", models[(c, w)])]))
        for c, w in grid
    ]


@dataclass
class AttributeHead:
    """A classifier of one attribute; ``fit(x_train, y_train, x_val, y_val)`` picks ``C`` on val."""

    name: str
    config: HeadConfig
    pipeline_: Pipeline | None = None
    c_: float | None = None  # C (linear, mlp) or k (knn) of the chosen setting
    class_weight_: str | None = None  # linear: the chosen class weighting
    val_accuracy_: dict[float, float] = field(default_factory=dict)  # per C / k: best over weights

    def _settings(self, n_train: int) -> list[tuple[float, str]]:
        cfg = self.config
        if cfg.model == "knn":
            ks = sorted({min(int(k), n_train) for k in cfg.k_grid})
            return [(float(k), "none") for k in ks]
        weights = [w for w in CLASS_WEIGHTS if w in cfg.class_weights]
        if cfg.model != "linear":
            weights = ["balanced"]  # recorded only: the MLP has no class_weight
        return [(float(c), w) for c in sorted(float(c) for c in cfg.c_grid) for w in weights]

    def fit(
        self,
        x_train: np.ndarray,
        y_train: Sequence[Any],
        x_val: np.ndarray | None = None,
        y_val: Sequence[Any] | None = None,
    ) -> AttributeHead:
        """Raises :class:`ConfigError` when train has fewer than two classes. Without val rows the
        middle of ``c_grid`` is used."""
        y_tr = np.asarray(y_train).astype(str)
        if len(np.unique(y_tr)) < 2:
            raise ConfigError(f"attribute {self.name!r}: the train split has fewer than 2 classes")
        grid = self._settings(len(y_tr))
        if x_val is None or y_val is None or len(x_val) == 0:
            self.c_, self.class_weight_ = grid[len(grid) // 2]
            self.pipeline_ = _estimator(self.config, self.c_, self.class_weight_).fit(x_train, y_tr)
            return self
        y_v = np.asarray(y_val).astype(str)
        best: tuple[float, str, float, Pipeline] | None = None
        for c, weight, fitted in _fits(self.config, grid, x_train, y_tr):
            score = float(accuracy_score(y_v, fitted.predict(x_val)))
            self.val_accuracy_[c] = max(score, self.val_accuracy_.get(c, -1.0))
            if best is None or score > best[2]:
                best = (c, weight, score, fitted)
        assert best is not None
        self.c_, self.class_weight_, score, self.pipeline_ = best
        log.info(
            "head %s: %s=%g %s (val acc@1 %.3f)",
            self.name,
            "k" if self.config.model == "knn" else "C",
            self.c_,
            self.class_weight_,
            score,
        )
        return self

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self._fitted().classes_)

    def _fitted(self) -> Pipeline:
        if self.pipeline_ is None:
            raise ConfigError(f"attribute head {self.name!r} is not fitted")
        return self.pipeline_

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, n_classes)`` probabilities, columns in the order of :attr:`classes_`."""
        return np.asarray(self._fitted().predict_proba(x))

    def top_k(self, x: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per row, the ``k`` most probable ``(class, probability)``, most probable first."""
        proba = self.predict_proba(x)
        classes = self.classes_
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [
            [(str(classes[j]), float(p[j])) for j in row]
            for p, row in zip(proba, order, strict=True)
        ]


def save_heads(
    heads: Mapping[str, AttributeHead], directory: Path, meta: Mapping[str, Any]
) -> Path:
    """Write ``<name>.skops`` per head and ``heads.json`` (configs, chosen ``C``, classes and
    ``meta``, e.g. the extractor fingerprint and the feature settings)."""
    import skops.io as sio

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    described = {}
    for name, head in heads.items():
        sio.dump(head._fitted(), directory / f"{name}.skops")
        described[name] = {
            "config": asdict(head.config),
            "c": head.c_,
            "class_weight": head.class_weight_,
            "classes": [str(c) for c in head.classes_],
        }
    doc = {"heads": described, **dict(meta)}
    (directory / HEADS_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} holds no {HEADS_FILE}: not a saved set of attribute heads")
    return dict(json.loads(path.read_text()))


def load_heads(directory: Path) -> tuple[dict[str, AttributeHead], dict[str, Any]]:
    """``(heads, meta)`` saved by :func:`save_heads`; a file with an untrusted type is refused."""
    import skops.io as sio

    meta = read_meta(directory)
    heads: dict[str, AttributeHead] = {}
    for name, desc in meta["heads"].items():
        path = Path(directory) / f"{name}.skops"
        untrusted = sio.get_untrusted_types(file=path)
        bad = [t for t in untrusted if not t.startswith(_TRUSTED_MODULES)]
        if bad:
            raise UntrustedModelError(f"{path}: refuses to load types {bad}")
        pipeline = sio.load(path, trusted=untrusted)
        cfg = HeadConfig.from_mapping(desc["config"], {})
        heads[name] = AttributeHead(
            name, cfg, pipeline_=pipeline, c_=desc.get("c"), class_weight_=desc.get("class_weight")
        )
    return heads, {k: v for k, v in meta.items() if k != "heads"}
