"""The search page's session feedback: impressions of the lists shown, this session's votes,
and the "Refine" button (Rocchio relevance feedback through the model's ``liked`` /
``disliked`` params). Used by ``app/search_page.py``; needs a Streamlit script run."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from imgsearch.search.interleave import TEAM
from registry.feedback import DOWN, UP, FeedbackStore
from registry.impressions import Impression, ImpressionStore, Versions
from registry.params import DISLIKED, LIKED
from registry.search import Served


@st.cache_resource
def impression_store(url: str) -> ImpressionStore:
    return ImpressionStore(url)


def session_votes(qsha: str) -> dict[str, int]:
    """This session's votes on the results of query ``qsha``: image id -> +1 / -1 (last wins)."""
    votes: dict[str, dict[str, int]] = st.session_state.setdefault("votes", {})
    return votes.setdefault(qsha, {})


def feedback_params(qsha: str) -> dict[str, str]:
    """``liked`` / ``disliked`` for the search once "refine" was pressed for this query."""
    if qsha not in st.session_state.setdefault("refined", set()):
        return {}
    votes = session_votes(qsha)
    return {
        LIKED: ",".join(i for i, v in votes.items() if v == UP),
        DISLIKED: ",".join(i for i, v in votes.items() if v == DOWN),
    }


def refine_button(qsha: str) -> None:
    """Re-search with this query's votes (Rocchio; the thumbs-down results drop out)."""
    votes = session_votes(qsha)
    if not votes:
        return
    up = sum(v == UP for v in votes.values())
    label = f"Refine: more like the {up} liked, less like the {len(votes) - up} disliked"
    if st.button(label, key=f"refine-{qsha[:16]}"):
        st.session_state["refined"].add(qsha)
        st.rerun()


def record_impression(
    hits: pd.DataFrame,
    served: Served,
    qsha: str,
    query_image_id: str | None,
    query_text: str | None,
    params: dict[str, Any],
    store: FeedbackStore,
) -> str:
    """The id of the result list shown; stored once per distinct list (Streamlit re-runs the
    page on every click: a re-run showing the same list is the same impression). An A/B list
    (``served.ab``) is stored with each result's team and the two arms."""
    shown = tuple(hits["image_id"].astype(str)) if "image_id" in hits.columns else ()
    key = repr((qsha, shown, sorted(params.items())))
    seen: dict[str, str] = st.session_state.setdefault("impressions", {})
    if key not in seen:
        impression = Impression(
            query_sha256=qsha,
            results=hits,
            versions=Versions(
                index=served.index_version,
                extractor=served.extractor_version,
                reranker=served.reranker_version,
            ),
            session=st.session_state["session"],
            query_image_id=query_image_id,
            query_text=query_text,
            ab_arms=(
                (served.ab.label_a, served.ab.label_b)
                if served.ab is not None and TEAM in hits.columns
                else None
            ),
        )
        seen[key] = impression_store(store.url).record(impression)
    return seen[key]
