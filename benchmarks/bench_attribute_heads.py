"""Benchmark attribute heads: feature sets x heads side by side, chosen on val, reported on test.

Reads a pipeline's runs from a tracking store (give the ids: the ``split`` run, the baseline and
the fine-tuned ``extract`` runs), and prints, per attribute, one row per (feature set, head) with
val acc@1 / acc@3 (what a choice may look at) and test acc@1 / acc@3 (items no head saw; reported,
never tuned on), beside the issue's targets. Every head is fitted on train only; its ``C`` (or
``k``) and class weighting are chosen on val.

Feature sets (each L2-normalised, then concatenated, as :func:`imgsearch.models.attribute_heads.head_input`):
``finetuned`` (the fine-tuned extract run's embeddings), ``baseline`` (the baseline extract
run's), and, with ``--features-cache`` (an ``.npz`` of ``ids``, ``pooled``, ``gram`` computed by
the fine-tuned extractor, :func:`imgsearch.embed.style.manifest_features`; computed and written
there when missing), ``pooled`` (the fine-tuned backbone's pooled features, before its projection
head) and ``gram`` (Gram statistics of blocks 3, 6, 10).

Heads: ``lr`` (StandardScaler + LogisticRegression, ``C`` and ``class_weight`` balanced / none
chosen on val), ``mlp`` (the step's MLP option, ``alpha = 1 / C`` chosen on val), ``knn`` (cosine,
distance-weighted, ``k`` chosen on val) and, for category, ``hier`` (the subcategory head's
probabilities summed per category; its settings chosen on val by category accuracy).

Item texts are not used: a query image has none.

    python -m benchmarks.bench_attribute_heads --split-run-id S --baseline-run-id B \
        --finetuned-run-id F [--features-cache feats.npz] [--mlp]

Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imgsearch.embed.files import load_embeddings
from imgsearch.evaluate.classification import top_k_accuracy
from imgsearch.models.attribute_heads import head_input
from steps.artifacts import artifact_path

TARGETS = {"category": (0.85, 0.95), "subcategory": (0.70, 0.85), "vendor": (0.95, None)}
C_GRID = (0.01, 0.1, 1.0)  # 10 dropped: the slowest to converge (not chosen in the full demo step)
K_GRID = (5, 10, 20, 40)
Scorer = Callable[[np.ndarray], np.ndarray]


def _artifact(run_id: str, name: str) -> str:
    return str(artifact_path(run_id, name))


def load_features(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """``(manifest rows in feature order, {set: (N, D)})`` for the images every set has."""
    manifest = pd.read_parquet(_artifact(args.split_run_id, "manifest.parquet"))
    manifest = manifest.astype({"image_id": str}).drop_duplicates("image_id")
    sets: dict[str, pd.DataFrame | np.ndarray] = {}
    tables: list[tuple[str, list[str], np.ndarray]] = []
    for name, run in (("finetuned", args.finetuned_run_id), ("baseline", args.baseline_run_id)):
        ids, emb = load_embeddings(_artifact(run, "embeddings.parquet"))
        tables.append((name, [str(i) for i in ids], np.asarray(emb, np.float32)))
    if args.features_cache:
        cache = Path(args.features_cache)
        if not cache.is_file():
            _compute_cache(args.finetuned_run_id, manifest, cache)
        data = np.load(cache, allow_pickle=False)
        cids = [str(i) for i in data["ids"]]
        tables += [(k, cids, data[k]) for k in ("pooled", "gram") if k in data]
    common = set(tables[0][1])
    for _, ids_, _ in tables[1:]:
        common &= set(ids_)
    order = [i for i in tables[0][1] if i in common]
    for name, ids_, x in tables:
        pos = {i: n for n, i in enumerate(ids_)}
        sets[name] = x[[pos[i] for i in order]]
    rows = manifest.set_index("image_id").reindex(order).reset_index()
    print(f"{len(order)} images; sets " + ", ".join(f"{k} {v.shape[1]}" for k, v in sets.items()))
    return rows, {k: np.asarray(v) for k, v in sets.items()}


def _compute_cache(extract_run_id: str, manifest: pd.DataFrame, cache: Path) -> None:
    from imgsearch.embed.style import manifest_features
    from imgsearch.models.backbones import load_extractor

    extractor = load_extractor(Path(_artifact(extract_run_id, "extractor")))
    pre = pd.read_parquet(_artifact(extract_run_id, "manifest.parquet")).astype({"image_id": str})
    rows = manifest.drop(columns=["pre_path"], errors="ignore").merge(
        pre[["image_id", "pre_path"]], on="image_id", how="left"
    )
    found = manifest_features(extractor, rows, ["pooled", "gram"], (3, 6, 10))
    np.savez(cache, ids=np.asarray(found.ids), **found.features)


def _scores(y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> tuple[float, float]:
    return (
        top_k_accuracy(y, proba, list(classes), 1),
        top_k_accuracy(y, proba, list(classes), 3),
    )


def _lr(c: float, balanced: bool, seed: int = 0) -> object:
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(
            C=c, class_weight="balanced" if balanced else None, max_iter=500, random_state=seed
        ),
    )


def _mlp(c: float, seed: int = 0) -> object:
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(256,), alpha=1.0 / c, max_iter=300, random_state=seed),
    )


def _knn(k: int) -> object:
    return KNeighborsClassifier(
        n_neighbors=k, metric="cosine", weights="distance", algorithm="brute"
    )


def fit_grid(
    make: Callable[..., object],
    grid: Sequence[tuple[object, ...]],
    x: np.ndarray,
    y: np.ndarray,
    split: np.ndarray,
    score_val: Callable[[object], float] | None = None,
) -> tuple[tuple[object, ...], object, float]:
    """Fit each setting on train; keep the best by val acc@1 (ties: the first, most regularised)."""
    tr, va = split == "train", split == "val"
    best: tuple[tuple[object, ...], object, float] | None = None
    for setting in grid:
        model = make(*setting).fit(x[tr], y[tr])  # type: ignore[attr-defined]
        score = score_val(model) if score_val else float((model.predict(x[va]) == y[va]).mean())  # type: ignore[attr-defined]
        if best is None or score > best[2]:
            best = (setting, model, score)
    assert best is not None
    return best


def evaluate_model(
    model: object, x: np.ndarray, y: np.ndarray, split: np.ndarray
) -> dict[str, float]:
    out: dict[str, float] = {}
    classes = [str(c) for c in model.classes_]  # type: ignore[attr-defined]
    for s in ("val", "test"):
        m = split == s
        a1, a3 = _scores(y[m], model.predict_proba(x[m]), classes)  # type: ignore[attr-defined]
        out[f"{s}_acc@1"], out[f"{s}_acc@3"] = a1, a3
    return out


def hierarchy(
    x: np.ndarray, sub: np.ndarray, cat: np.ndarray, split: np.ndarray, grid: Sequence[tuple]
) -> tuple[tuple[object, ...], dict[str, float]]:
    """Category from the subcategory head: its probabilities summed per category."""
    tr = split == "train"
    parent = pd.Series(cat[tr]).groupby(pd.Series(sub[tr])).agg(lambda s: s.mode().iloc[0])
    cats = sorted(set(cat[tr]))

    def proba(model: object, rows: np.ndarray) -> np.ndarray:
        p = model.predict_proba(x[rows])  # type: ignore[attr-defined]
        out = np.zeros((len(p), len(cats)))
        col = {c: i for i, c in enumerate(cats)}
        for j, s in enumerate(model.classes_):  # type: ignore[attr-defined]
            out[:, col[parent[s]]] += p[:, j]
        return out

    def val_acc(model: object) -> float:
        va = split == "val"
        return _scores(cat[va], proba(model, va), cats)[0]

    setting, model, _ = fit_grid(_lr, grid, x, sub, split, val_acc)
    out: dict[str, float] = {}
    for s in ("val", "test"):
        m = split == s
        out[f"{s}_acc@1"], out[f"{s}_acc@3"] = _scores(cat[m], proba(model, m), cats)
    return setting, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split-run-id", required=True)
    parser.add_argument("--baseline-run-id", required=True)
    parser.add_argument("--finetuned-run-id", required=True)
    parser.add_argument("--features-cache", help=".npz of pooled + gram (written when missing)")
    parser.add_argument("--mlp", action="store_true", help="also the MLP head (slow)")
    parser.add_argument("--attributes", nargs="+", default=["category", "subcategory", "vendor"])
    parser.add_argument("--sets", nargs="+", help="only these feature sets, e.g. finetuned+pooled")
    args = parser.parse_args()

    rows, sets = load_features(args)
    split = rows["split"].fillna("").astype(str).to_numpy()
    candidates = {
        "category": [
            ["finetuned"],
            ["baseline"],
            ["finetuned", "baseline"],
            ["pooled"],
            ["finetuned", "pooled"],
        ],
        "vendor": [
            ["gram"],
            ["finetuned", "gram"],
            ["baseline", "gram"],
            ["pooled", "gram"],
            ["baseline"],
        ],
    }
    candidates["subcategory"] = candidates["category"]
    lr_grid = list(itertools.product(C_GRID, (True, False)))
    results = []
    for attr in args.attributes:
        y = rows[attr].fillna("").astype(str).to_numpy()
        for names in candidates[attr]:
            if any(n not in sets for n in names) or (
                args.sets and "+".join(names) not in args.sets
            ):
                continue
            x = head_input(sets, names)
            feat = "+".join(names)
            heads: list[tuple[str, Callable[..., object], Sequence[tuple]]] = [
                ("knn", _knn, [(k,) for k in K_GRID]),
                ("lr", _lr, lr_grid),
            ]
            if args.mlp:
                heads.append(("mlp", _mlp, [(c,) for c in (0.1, 1.0, 10.0)]))
            for head, make, grid in heads:
                t0 = time.perf_counter()
                setting, model, _ = fit_grid(make, grid, x, y, split)
                figures = evaluate_model(model, x, y, split)
                results.append(
                    {
                        "attribute": attr,
                        "features": feat,
                        "head": head,
                        "setting": setting,
                        **figures,
                        "s": round(time.perf_counter() - t0, 1),
                    }
                )
                print(results[-1], flush=True)
            if attr == "category":
                sub = rows["subcategory"].fillna("").astype(str).to_numpy()
                t0 = time.perf_counter()
                setting, figures = hierarchy(x, sub, y, split, lr_grid)
                results.append(
                    {
                        "attribute": attr,
                        "features": feat,
                        "head": "hier(sub lr)",
                        "setting": setting,
                        **figures,
                        "s": round(time.perf_counter() - t0, 1),
                    }
                )
                print(results[-1], flush=True)
    table = pd.DataFrame(results)
    pd.set_option("display.width", 200)
    for attr, part in table.groupby("attribute", sort=False):
        best = part.loc[part["val_acc@1"].idxmax()]
        target = TARGETS.get(str(attr))
        print(
            f"\n## {attr} (target acc@1 / acc@3: {target}); chosen on val: "
            f"{best['features']} {best['head']} {best['setting']} -> test "
            f"{best['test_acc@1']:.3f} / {best['test_acc@3']:.3f}"
        )
        print(part.drop(columns="attribute").to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
