"""Names for clusters, each with the source it came from; never a name invented from nothing.

Sources, in order of preference (the ``name_source`` column says which one named a cluster):

- ``labels``: where some members are labelled, the majority label of the labelled members, with
  its ``purity`` (share of the labelled members that carry it) and ``n_labelled``;
- ``label_neighbours``: a cluster without a labelled member, when labelled images exist
  elsewhere, takes the majority label of the ``n_neighbours`` labelled images nearest its
  centroid (purity among those neighbours);
- ``keywords``: where the members have words (their item texts, or zero-shot keywords of each
  image from :mod:`imgsearch.categorize.keywords`), the top words of a class-based TF-IDF across
  clusters (:class:`ClassTfidf`, the c-TF-IDF of BERTopic, Grootendorst 2022): a cluster's
  keywords are what sets it apart from the other clusters, not what is common everywhere;
- ``cluster``: else ``"cluster N"``; its representative images (see the gallery) show what it is.

Keywords are computed whenever words exist, so a cluster named by its labels still lists them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.preprocessing import normalize

NAME_COLUMNS = (
    "name",
    "name_source",
    "keywords",
    "purity",
    "n_labelled",
)


class ClassTfidf:
    """Class-based TF-IDF (BERTopic's ``ClassTfidfTransformer``, without its options).

    ``X`` is a ``(n_classes, n_terms)`` count matrix: all documents of a class joined into one.
    ``tf`` is each row L1-normalised; ``idf_t = log(1 + A / f_t)`` where ``A`` is the mean number
    of words per class and ``f_t`` the frequency of term ``t`` over all classes. The score is
    ``tf * idf``. Terms that never occur get idf 0 (BERTopic would divide by zero).
    """

    def fit(self, X: sp.spmatrix | np.ndarray) -> ClassTfidf:
        counts = sp.csr_matrix(X, dtype=np.float64)
        freq = np.asarray(counts.sum(axis=0)).ravel()
        avg = float(counts.sum(axis=1).mean()) if counts.shape[0] else 0.0
        self.idf_ = np.zeros_like(freq)
        seen = freq > 0
        self.idf_[seen] = np.log(avg / freq[seen] + 1.0)
        return self

    def transform(self, X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        tf = normalize(sp.csr_matrix(X, dtype=np.float64), norm="l1", axis=1)
        return sp.csr_matrix(tf @ sp.diags(self.idf_))

    def fit_transform(self, X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        return self.fit(X).transform(X)


def _as_tokens(doc: Sequence[str]) -> list[str]:
    return [str(w).strip().lower() for w in doc if str(w).strip()]


def group_keywords(
    groups: Sequence[int] | np.ndarray,
    docs: Sequence[Sequence[str]],
    top: int = 5,
    min_df: int = 1,
) -> dict[int, list[tuple[str, float]]]:
    """Top-``top`` c-TF-IDF keywords of each group, with scores (groups without words: none).

    ``docs[i]`` is the list of words (tags, keywords; a multi-word tag stays one term) of the
    image in ``groups[i]``. ``min_df``: a term must occur in at least this many groups.
    """
    groups_arr = np.asarray(groups)
    if len(groups_arr) != len(docs):
        raise ValueError(f"{len(docs)} documents for {len(groups_arr)} images")
    ids = np.unique(groups_arr)
    joined: dict[int, list[str]] = {int(g): [] for g in ids}
    for g, doc in zip(groups_arr, docs, strict=True):
        joined[int(g)].extend(_as_tokens(doc))
    order = [int(g) for g in ids]
    if not any(joined[g] for g in order):
        return {g: [] for g in order}
    vectorizer = CountVectorizer(analyzer=lambda d: d, min_df=min_df)
    try:
        counts = vectorizer.fit_transform([joined[g] for g in order])
    except ValueError:  # min_df left no term
        return {g: [] for g in order}
    scores = ClassTfidf().fit_transform(counts).toarray()
    terms = vectorizer.get_feature_names_out()
    out: dict[int, list[tuple[str, float]]] = {}
    for row, g in enumerate(order):
        # ties broken by the term itself, so the ranking does not depend on the vocabulary order
        ranked = sorted(
            ((float(s), str(t)) for s, t in zip(scores[row], terms, strict=True) if s > 0),
            key=lambda st: (-st[0], st[1]),
        )
        out[g] = [(t, s) for s, t in ranked[:top]]
    return out


@dataclass(frozen=True)
class LabelVote:
    label: str
    purity: float
    n: int


def majority(labels: Sequence[object]) -> LabelVote | None:
    """The most common non-missing label (ties: the alphabetically first), its share and count."""
    values = pd.Series(list(labels), dtype=object).dropna().astype(str)
    values = values[values.str.strip() != ""]
    if values.empty:
        return None
    counts = values.value_counts()
    best = counts[counts == counts.max()].index.min()
    return LabelVote(str(best), float(counts[best] / len(values)), int(len(values)))


def label_votes(
    groups: Sequence[int] | np.ndarray, labels: Sequence[object] | None
) -> dict[int, LabelVote]:
    """Majority label of each group's labelled members (groups with none are absent)."""
    if labels is None:
        return {}
    groups_arr = np.asarray(groups)
    values = np.asarray(list(labels), dtype=object)
    if len(values) != len(groups_arr):
        raise ValueError(f"{len(values)} labels for {len(groups_arr)} images")
    out = {}
    for g in np.unique(groups_arr):
        vote = majority(values[groups_arr == g].tolist())
        if vote is not None:
            out[int(g)] = vote
    return out


def neighbour_votes(
    centroids: Mapping[int, np.ndarray],
    labelled_emb: np.ndarray,
    labelled: Sequence[object],
    n_neighbours: int = 5,
) -> dict[int, LabelVote]:
    """Majority label of the ``n_neighbours`` labelled images nearest each centroid (cosine)."""
    if not len(labelled) or not centroids:
        return {}
    x = np.asarray(labelled_emb, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    names = np.asarray([str(v) for v in labelled], dtype=object)
    out = {}
    for g, c in centroids.items():
        sims = x @ np.asarray(c, np.float32)
        nearest = np.argsort(-sims, kind="stable")[: max(1, n_neighbours)]
        vote = majority(names[nearest].tolist())
        if vote is not None:
            out[g] = vote
    return out


def name_groups(
    group_ids: Sequence[int],
    votes: Mapping[int, LabelVote],
    keywords: Mapping[int, list[tuple[str, float]]],
    neighbours: Mapping[int, LabelVote] | None = None,
    prefix: str = "cluster",
    name_words: int = 2,
) -> pd.DataFrame:
    """One row per group: ``group`` + NAME_COLUMNS (keywords ``;``-joined), sources as documented."""
    rows = []
    for g in group_ids:
        words = [w for w, _ in keywords.get(g, [])]
        vote = votes.get(g)
        source = "labels"
        if vote is None and neighbours:
            vote, source = neighbours.get(g), "label_neighbours"
        if vote is not None:
            name, purity, n = vote.label, vote.purity, vote.n
        elif words:
            name, source, purity, n = ", ".join(words[:name_words]), "keywords", np.nan, 0
        else:
            name, source, purity, n = f"{prefix} {g}", "cluster", np.nan, 0
        rows.append(
            {
                "group": g,
                "name": name,
                "name_source": source,
                "keywords": ";".join(words),
                "purity": purity,
                "n_labelled": n,
            }
        )
    return pd.DataFrame(rows, columns=["group", *NAME_COLUMNS])
