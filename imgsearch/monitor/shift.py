"""What moved: reference clusters that grew or shrank, and metadata shares of two manifests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.monitor.scores import _as_2d


def explain_shift(
    reference_emb: np.ndarray,
    current_emb: np.ndarray,
    k: int = 8,
    seed: int = 0,
    reference_ids: np.ndarray | None = None,
    examples: int = 3,
) -> pd.DataFrame:
    """Which K-means clusters of the reference grew or shrank in the current data.

    K-means (``k`` clusters) is fitted on the reference; current rows go to their nearest centroid.
    One row per cluster: ``cluster, ref_count, cur_count, ref_share, cur_share, delta``
    (cur - ref share), ``lift`` (cur / ref share), ``z`` (two-proportion z score) and ``examples``
    (ids, or positions, of the reference rows nearest the centroid), sorted by ``|delta|``, largest
    first. A last row ``cluster = -1`` ("novel") counts current rows farther from every centroid
    than 99% of the reference rows are from theirs.
    """
    from sklearn.cluster import KMeans

    ref = _as_2d("reference_emb", reference_emb)
    cur = _as_2d("current_emb", current_emb)
    k = max(1, min(int(k), ref.shape[0]))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(ref)
    ref_d = km.transform(ref)
    cur_d = km.transform(cur)
    ref_lab, cur_lab = ref_d.argmin(1), cur_d.argmin(1)
    far = float(np.quantile(ref_d.min(1), 0.99))
    novel = cur_d.min(1) > far

    n_r, n_c = ref.shape[0], cur.shape[0]
    ids = np.arange(n_r) if reference_ids is None else np.asarray(reference_ids)
    rows: list[dict[str, Any]] = []

    def row(cluster: int, rc: int, cc: int, near: list[str]) -> dict[str, Any]:
        p_r, p_c = rc / n_r, cc / n_c
        pooled = (rc + cc) / (n_r + n_c)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_r + 1 / n_c)) if 0 < pooled < 1 else 0.0
        return {
            "cluster": cluster,
            "ref_count": rc,
            "cur_count": cc,
            "ref_share": p_r,
            "cur_share": p_c,
            "delta": p_c - p_r,
            "lift": p_c / p_r if p_r > 0 else math.inf,
            "z": (p_c - p_r) / se if se > 0 else 0.0,
            "examples": ";".join(near),
        }

    for c in range(k):
        near = np.argsort(ref_d[:, c])[:examples]
        rows.append(
            row(
                c,
                int((ref_lab == c).sum()),
                int((cur_lab == c).sum()),
                [str(i) for i in ids[near]],
            )
        )
    table = pd.DataFrame(rows)
    table = table.reindex(table["delta"].abs().sort_values(ascending=False).index)
    novel_row = pd.DataFrame([row(-1, int((ref_d.min(1) > far).sum()), int(novel.sum()), [])])
    return pd.concat([table, novel_row], ignore_index=True)


def _shares(series: pd.Series) -> pd.Series:
    values = series.astype("object").where(series.notna(), "<missing>").astype(str)
    return values.value_counts(normalize=True)


def metadata_shift(
    ref_manifest: pd.DataFrame,
    cur_manifest: pd.DataFrame,
    columns: tuple[str, ...] = (schema.CATEGORY, schema.NSFW, schema.FORMAT),
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Share of each value of ``columns`` (category, NSFW flag, file format) in both manifests.

    Returns ``(table, metrics)``: table rows ``attribute, value, ref_share, cur_share, delta``
    (missing values count as ``"<missing>"``; a column absent from both manifests is skipped),
    sorted by attribute then ``|delta|``; metrics ``tv_<attribute>`` (total variation distance,
    0..1) and ``nsfw_share_ref`` / ``nsfw_share_cur`` when an ``nsfw`` column exists.
    """
    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for col in columns:
        if col not in ref_manifest.columns and col not in cur_manifest.columns:
            continue
        empty = pd.Series([], dtype="object")
        ref = _shares(ref_manifest[col] if col in ref_manifest.columns else empty)
        cur = _shares(cur_manifest[col] if col in cur_manifest.columns else empty)
        both = pd.concat([ref.rename("ref_share"), cur.rename("cur_share")], axis=1).fillna(0.0)
        both["delta"] = both["cur_share"] - both["ref_share"]
        metrics[f"tv_{col}"] = float(both["delta"].abs().sum() / 2.0)
        both = both.reindex(both["delta"].abs().sort_values(ascending=False).index)
        for value, r in both.iterrows():
            rows.append(
                {
                    "attribute": col,
                    "value": str(value),
                    "ref_share": float(r["ref_share"]),
                    "cur_share": float(r["cur_share"]),
                    "delta": float(r["delta"]),
                }
            )
        if col == schema.NSFW:
            for name, frame in (("ref", ref_manifest), ("cur", cur_manifest)):
                flags = pd.to_numeric(frame.get(col), errors="coerce") if col in frame else None
                if flags is not None and flags.notna().any():
                    metrics[f"nsfw_share_{name}"] = float((flags.dropna() != 0).mean())
    table = pd.DataFrame(rows, columns=["attribute", "value", "ref_share", "cur_share", "delta"])
    return table, metrics
