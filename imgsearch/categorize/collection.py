"""Categorise a collection: clusters (:mod:`.clusters`), names (:mod:`.naming`), figures.

:func:`categorize` takes embeddings and whatever the collection has (labels for naming, words per
image, true attributes for measuring only) and returns two tables and a metrics dict:

- ``categories``: one row per node of the two-level tree: ``level`` (category | cluster),
  ``cluster_id``, ``parent`` (a cluster's category; -1 for a category), ``name``,
  ``name_source``, ``keywords`` (``;``-joined, the first language) and ``keywords_<lang>``,
  ``size``, ``cohesion`` (mean cosine similarity of members to the node's centroid),
  ``purity``/``n_labelled`` (of the naming labels, where they exist), ``n_outliers`` and
  ``representatives`` (``;``-joined image ids nearest the centroid);
- ``assignments``: :data:`.clusters.ASSIGNMENT_COLUMNS` plus the cluster's ``name`` and
  ``keywords`` for every image;
- metrics: ``n_clusters`` (the k used), ``n_categories``, ``outlier_share``, ``mean_confidence``, ``mean_cohesion``,
  ``n_named_by_<source>``, and against each truth column (labels hidden from the clustering):
  ``{level}_{truth}_nmi`` / ``_ari`` (scikit-learn) / ``_purity``, on all images and, where a
  split exists, on the test images (``test_...``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from imgsearch import schema
from imgsearch.categorize.clusters import (
    ClusterConfig,
    Clustering,
    cluster,
    normalised,
    representatives,
)
from imgsearch.categorize.naming import group_keywords, label_votes, name_groups, neighbour_votes
from imgsearch.config import from_dict
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

LEVELS = (("cluster", "cluster_id"), ("category", "category_id"))


@dataclass(frozen=True)
class CategorizeConfig:
    """``configs/categorize.yaml``: clustering, naming and measuring settings."""

    clusters: ClusterConfig = field(default_factory=ClusterConfig)
    label_column: str | None = None  # labels used for naming only; None = names without labels
    n_neighbours: int = 5  # label_neighbours: labelled images nearest a centroid
    keywords_top: int = 5
    name_words: int = 2  # a keywords name joins this many top keywords
    truth_columns: tuple[str, ...] = (schema.SUBCATEGORY, schema.CATEGORY)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> CategorizeConfig:
        data = dict(data or {})
        clusters = from_dict(ClusterConfig, data.pop("clusters", None))
        cfg = from_dict(cls, data)
        return CategorizeConfig(**{**cfg.__dict__, "clusters": clusters})


@dataclass
class CategorizeResult:
    categories: pd.DataFrame
    assignments: pd.DataFrame
    metrics: dict[str, float]
    clustering: Clustering


def purity(truth: Sequence[object] | np.ndarray, groups: Sequence[int] | np.ndarray) -> float:
    """Share of images whose group's most common true class is their own (1 = pure groups)."""
    table = contingency_matrix(np.asarray(truth).astype(str), np.asarray(groups))
    return float(table.max(axis=0).sum() / table.sum()) if table.size else float("nan")


def agreement(images: pd.DataFrame, assignments: pd.DataFrame, columns: Sequence[str]) -> dict:
    """NMI, ARI and purity of both levels against each truth column (rows with a value)."""
    out: dict[str, float] = {}
    scopes = [("", np.ones(len(images), bool))]
    if schema.SPLIT in images.columns:
        scopes.append(("test_", (images[schema.SPLIT] == "test").to_numpy()))
    for column in columns:
        if column not in images.columns:
            continue
        known = images[column].notna().to_numpy() & (images[column].astype(str) != "").to_numpy()
        for prefix, scope in scopes:
            rows = known & scope
            if rows.sum() < 2:
                continue
            truth = images.loc[rows, column].astype(str).to_numpy()
            for level, key in LEVELS:
                pred = assignments.loc[rows, key].to_numpy()
                name = f"{prefix}{level}_{column}"
                out[f"{name}_nmi"] = float(normalized_mutual_info_score(truth, pred))
                out[f"{name}_ari"] = float(adjusted_rand_score(truth, pred))
                out[f"{name}_purity"] = purity(truth, pred)
            out[f"{prefix}n_images_with_{column}"] = float(rows.sum())
    return out


def _cohesion(
    emb: np.ndarray, groups: np.ndarray, centroids: np.ndarray, batch: int = 65536
) -> np.ndarray:
    """Mean cosine similarity of each group's members to its centroid (batched: no copy of emb)."""
    sims = np.empty(len(emb), np.float64)
    for start in range(0, len(emb), batch):
        block = normalised(emb[start : start + batch])
        sims[start : start + len(block)] = np.einsum(
            "ij,ij->i", block, centroids[groups[start : start + len(block)]]
        )
    total = np.bincount(groups, weights=sims, minlength=len(centroids))
    sizes = np.bincount(groups, minlength=len(centroids))
    return np.divide(total, sizes, out=np.full(len(centroids), np.nan), where=sizes > 0)


def _level_table(
    level: str,
    key: str,
    res: Clustering,
    emb: np.ndarray,
    labels: Sequence[object] | None,
    docs: Mapping[str, Sequence[Sequence[str]]],
    cfg: CategorizeConfig,
) -> pd.DataFrame:
    assign = res.assignments
    groups = assign[key].to_numpy()
    centroids = res.centroids if level == "cluster" else res.category_centroids
    ids = list(range(len(centroids)))
    per_lang = {lang: group_keywords(groups, d, top=cfg.keywords_top) for lang, d in docs.items()}
    first = next(iter(per_lang.values()), {})
    votes = label_votes(groups, labels)
    neighbours = {}
    if labels is not None and votes:
        known = pd.Series(list(labels), dtype=object).notna().to_numpy()
        missing = {g: centroids[g] for g in ids if g not in votes}
        if missing and known.any():
            lab = np.asarray(list(labels), dtype=object)[known]
            neighbours = neighbour_votes(missing, emb[known], lab.tolist(), cfg.n_neighbours)
    table = name_groups(ids, votes, first, neighbours, prefix=level, name_words=cfg.name_words)
    for lang, kws in per_lang.items():
        table[f"keywords_{lang}"] = [";".join(w for w, _ in kws.get(g, [])) for g in ids]
    sizes = np.bincount(groups, minlength=len(ids))
    reps = representatives(assign, key, cfg.clusters.n_representatives)
    table = table.rename(columns={"group": "cluster_id"})
    table.insert(0, "level", level)
    table.insert(2, "parent", res.parent if level == "cluster" else np.full(len(ids), -1, np.int64))
    table["size"] = sizes
    table["cohesion"] = _cohesion(emb, groups, centroids, cfg.clusters.batch)
    table["n_outliers"] = np.bincount(groups[assign["outlier"].to_numpy()], minlength=len(ids))
    table["representatives"] = [";".join(reps.get(g, [])) for g in ids]
    return table


def categorize(
    image_ids: Sequence[str] | np.ndarray,
    emb: np.ndarray,
    images: pd.DataFrame | None = None,
    docs: Mapping[str, Sequence[Sequence[str]]] | None = None,
    cfg: CategorizeConfig | None = None,
) -> CategorizeResult:
    """Cluster, name and measure (see the module docstring).

    ``images``: one row per embedding, in the same order (``image_id`` plus whatever the
    collection has: the ``label_column`` for naming, truth columns and ``split`` for measuring).
    ``docs``: language -> words of each image (same order), the keywords source. Raises
    ``ValueError`` when ``images`` or ``docs`` do not match the embeddings, :class:`ConfigError`
    on a ``label_column`` the images lack.
    """
    cfg = cfg or CategorizeConfig()
    docs = dict(docs or {})
    for lang, d in docs.items():
        if len(d) != len(emb):
            raise ValueError(f"docs[{lang!r}] has {len(d)} entries for {len(emb)} images")
    meta = (
        images.reset_index(drop=True)
        if images is not None
        else pd.DataFrame(index=pd.RangeIndex(len(emb)))
    )
    if len(meta) != len(emb):
        raise ValueError(f"images has {len(meta)} rows for {len(emb)} embeddings")
    labels = None
    if cfg.label_column:
        if cfg.label_column not in meta.columns:
            raise ConfigError(
                f"label_column {cfg.label_column!r} is not a column of the images; "
                f"columns: {sorted(meta.columns)}"
            )
        labels = meta[cfg.label_column].where(meta[cfg.label_column].notna(), None).tolist()
    res = cluster(np.asarray(image_ids), emb, cfg.clusters)
    tables = [_level_table(lv, key, res, emb, labels, docs, cfg) for lv, key in LEVELS]
    categories = pd.concat(tables[::-1], ignore_index=True)
    fine = tables[0].set_index("cluster_id")
    assignments = res.assignments.assign(
        name=fine["name"].reindex(res.assignments["cluster_id"]).to_numpy(),
        keywords=fine["keywords"].reindex(res.assignments["cluster_id"]).to_numpy(),
    )
    metrics = {
        "n_images": float(len(assignments)),
        "n_clusters": float(len(res.centroids)),  # k as chosen (a result: "k" is a setting key)
        "n_categories": float(len(res.category_centroids)),
        "outlier_share": float(assignments["outlier"].mean()),
        "mean_confidence": float(assignments["confidence"].mean()),
        "mean_cohesion": float(np.nanmean(tables[0]["cohesion"])),
        **{f"silhouette_k_{k}": v for k, v in res.k_scores.items()},
        **{f"seconds_{phase}": v for phase, v in res.seconds.items()},
    }
    for source, n in tables[0]["name_source"].value_counts().items():
        metrics[f"n_named_by_{source}"] = float(n)
    metrics.update(agreement(meta, assignments, cfg.truth_columns))
    return CategorizeResult(categories, assignments, metrics, res)
