"""2-D plots of embeddings (t-SNE, UMAP), coloured by category, for the evaluate step."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.errors import ConfigError
from imgsearch.evaluate import metrics as M
from imgsearch.evaluate.retrieval import sample_queries

log = logging.getLogger(__name__)


def embedding_plots(
    emb: np.ndarray,
    categories: np.ndarray | Sequence[Any] | None,
    out_dir: Path,
    max_points: int = 2000,
    seed: int = 0,
    methods: Sequence[str] = ("tsne", "umap"),
    title: str | None = None,
) -> list[Path]:
    """2-D t-SNE (scikit-learn) and UMAP (umap-learn) scatter plots coloured by category.

    A seeded sample of at most ``max_points`` embeddings is projected (after PCA to 50 dimensions
    for t-SNE). With more than 19 categories, the 19 most frequent get a colour and the rest are
    grey "other". ``title`` (the model and run) heads each plot. The view is clipped to the bulk
    of the points (0.5-99.5th percentile, plus a margin), so a few outliers do not squeeze the rest
    into a corner. Writes ``embeddings_<method>.png`` into ``out_dir`` and returns their paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = M.l2_normalise(emb)
    n = len(x)
    if n < 5:
        raise ValueError(f"need at least 5 embeddings to plot, got {n}")
    cats = (
        np.full(n, "all", dtype=object)
        if categories is None
        else np.asarray(categories).astype(str)
    )
    if len(cats) != n:
        raise ValueError(f"{len(cats)} categories for {n} embeddings")
    idx = sample_queries(n, max_points, seed)
    x, cats = x[idx], cats[idx]
    names, counts = np.unique(cats, return_counts=True)
    keep = list(names[np.argsort(-counts, kind="stable")][:19]) if len(names) > 20 else list(names)
    shown = np.array([c if c in keep else "other" for c in cats], dtype=object)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for method in methods:
        # t-SNE/UMAP take a minute or more on a CPU with no progress of their own: say so
        log.info("evaluate: %s of %d embeddings...", method, len(x))
        started = time.perf_counter()
        xy = _project(x, method, seed)
        log.info("evaluate: %s done in %.0f s", method, time.perf_counter() - started)
        fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate([*keep, "other"]):
            mask = shown == name
            if mask.any():
                colour = (0.6, 0.6, 0.6, 1.0) if name == "other" else cmap(i % 20)
                ax.scatter(
                    xy[mask, 0], xy[mask, 1], s=6, color=colour, label=f"{name} ({int(mask.sum())})"
                )
        name = {"tsne": "t-SNE", "umap": "UMAP"}.get(method, method)
        heading = f"{name} of {len(x)} embeddings, coloured by category"
        ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
        _clip_to_bulk(ax, xy)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(
            fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )
        fig.tight_layout()
        path = out_dir / f"embeddings_{method}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _clip_to_bulk(ax: Any, xy: np.ndarray, q: float = 0.5, margin: float = 0.08) -> None:
    """Limit the axes to the ``q``..``100 - q`` percentile box of ``xy`` plus ``margin``."""
    lo, hi = np.percentile(xy, [q, 100 - q], axis=0)
    pad = np.where(hi > lo, (hi - lo) * margin, 1.0)  # all points equal: a unit box
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    n = len(x)
    if method == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        dims = min(50, n, x.shape[1])
        reduced = (
            PCA(n_components=dims, random_state=seed).fit_transform(x) if x.shape[1] > dims else x
        )
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        return np.asarray(
            TSNE(
                n_components=2, perplexity=perplexity, init="pca", random_state=seed
            ).fit_transform(reduced)
        )
    if method == "umap":
        import umap

        reducer = umap.UMAP(
            n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed
        )
        return np.asarray(reducer.fit_transform(x))
    raise ConfigError(f"unknown projection {method!r} (known: tsne, umap)")
