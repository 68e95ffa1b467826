"""Simulated users for measuring rerankers honestly: a hidden preference, position bias, noise.

A catalog is ``(vectors, meta)``: unit vectors (N, D) and a table with ``image_id`` and
``category`` (and optionally popularity columns). :func:`synthetic_catalog` makes one; the index
of a registered version is another (``steps.rerank``).

The hidden truth (what similarity alone does not capture), per query q and candidate d::

    grade(q, d) = 0                                  if category(d) != category(q)
                = 0                                  if style(d) is the disliked style
                = 1 + [popularity(d) >= median]      otherwise

``style`` is a hidden per-image attribute (a hash of the image id, :data:`N_STYLES` values):
users dislike one style, which no feature shows; only earlier votes reveal it (vote rates).

A session: the first stage ranks the gallery by cosine (the query image left out), ``shown``
results are displayed; the user examines rank k with probability ``1 / k**eta`` (position bias),
clicks (votes up) an examined result with probability ``click[grade]`` and votes down an
examined grade-0 result with probability ``p_down``. Train and test sessions draw their query
images from disjoint sets (by item), so the test queries are never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.search.ranking import popularity

N_STYLES = 4
DISLIKED_STYLE = 0


@dataclass(frozen=True)
class ClickModel:
    """Position-biased examination and graded click probabilities."""

    eta: float = 1.0
    click: tuple[float, float, float] = (0.05, 0.5, 0.9)
    p_down: float = 0.3

    def examine(self, ranks: np.ndarray) -> np.ndarray:
        return 1.0 / np.asarray(ranks, dtype=np.float64) ** self.eta


def synthetic_catalog(
    n_images: int = 800, n_categories: int = 10, dim: int = 32, spread: float = 1.4, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """Unit vectors around one centroid per category (``spread``: noise scale; larger = the
    first stage confuses categories more) and a metadata table with popularity columns."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_categories, dim))
    category = rng.integers(0, n_categories, size=n_images)
    vectors = centroids[category] + spread * rng.normal(size=(n_images, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    meta = pd.DataFrame(
        {
            schema.IMAGE_ID: [f"img{i}" for i in range(n_images)],
            schema.ITEM_ID: [f"item{i}" for i in range(n_images)],
            schema.CATEGORY: [f"c{c}" for c in category],
            schema.DOWNLOADS: rng.lognormal(3.0, 1.5, size=n_images).round(),
            schema.LIKES: rng.lognormal(1.0, 1.0, size=n_images).round(),
        }
    )
    return vectors.astype(np.float32), meta


def style_of(image_ids: pd.Series) -> np.ndarray:
    """The hidden style of each image: a stable hash of its id."""
    return np.array(
        [int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) % N_STYLES for i in image_ids]
    )


def true_grades(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: category codes, the 'good' flag (style liked) and the popularity bonus (0/1)."""
    cats = pd.factorize(meta[schema.CATEGORY].astype(str))[0]
    pop = popularity(meta)
    liked = style_of(meta[schema.IMAGE_ID]) != DISLIKED_STYLE
    bonus = (pop >= np.median(pop)).astype(np.int64)
    return cats, liked, bonus


def query_split(meta: pd.DataFrame, test_share: float = 0.3) -> np.ndarray:
    """True for images whose *item* is a test query (by a hash of the item id, stable)."""
    items = meta[schema.ITEM_ID].astype(str)
    h = np.array([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in items])
    return h < test_share


def simulate(
    vectors: np.ndarray,
    meta: pd.DataFrame,
    queries: np.ndarray,
    *,
    shown: int = 20,
    sessions_per_query: int = 1,
    clicks: ClickModel | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Simulated impressions with votes, one row per shown result.

    queries: gallery row numbers used as query images. Columns: ``query_id``, ``query_row``,
    ``rank`` (first-stage, 1-based), ``result_image_id``, ``similarity``, ``popularity``,
    ``category``, ``query_category``, ``grade`` (the hidden truth), ``vote`` (+1 / -1 / 0).
    """
    clicks = clicks or ClickModel()
    rng = np.random.default_rng(seed)
    cats, liked, bonus = true_grades(meta)
    pop = popularity(meta)
    ids = meta[schema.IMAGE_ID].astype(str).to_numpy()
    cat_names = meta[schema.CATEGORY].astype(str).to_numpy()
    frames = []
    for q in np.asarray(queries, dtype=np.int64):
        sims = vectors @ vectors[q]
        sims[q] = -np.inf  # the query image is not its own result
        top = np.argsort(-sims, kind="stable")[:shown]
        grade = np.where((cats[top] == cats[q]) & liked[top], 1 + bonus[top], 0)
        ranks = np.arange(1, len(top) + 1)
        for s in range(sessions_per_query):
            seen = rng.random(len(top)) < clicks.examine(ranks)
            up = seen & (rng.random(len(top)) < np.asarray(clicks.click)[grade])
            down = seen & ~up & (grade == 0) & (rng.random(len(top)) < clicks.p_down)
            frames.append(
                pd.DataFrame(
                    {
                        "query_id": f"q{q}-s{s}",
                        "query_row": q,
                        "rank": ranks,
                        "result_image_id": ids[top],
                        "similarity": sims[top].astype(np.float64),
                        "popularity": pop[top],
                        schema.CATEGORY: cat_names[top],
                        "query_category": cat_names[q],
                        "grade": grade,
                        "vote": np.where(up, 1, np.where(down, -1, 0)),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)
