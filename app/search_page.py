"""Search page: upload an image (or pick one from the catalog), or type words, and browse what the
champion finds.

Run from the repository root (``make search-ui`` does)::

    streamlit run app/search_page.py --client.toolbarMode viewer

The title is drawn at once; the search code (PyTorch, MLflow: several seconds to import on a cold
start) is imported under a spinner, and the served model is loaded on the first run of a session
(``st.cache_resource``: once per process). The body is :mod:`app.search_view`.

It loads ``imgsearch-index@champion`` (``configs/search.yaml``) in-process from the tracking
store in ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``) and shows which index and
extractor versions answer. Results come as a grid (thumbnail, item name, the catalog's display
attributes such as the drawing's vendor and category, score, similarity, and popularity where
the catalog has it) with thumbs up / down per result, stored by :mod:`registry.feedback`.

Environment: ``MLFLOW_TRACKING_URI`` (the registry), ``IMGSEARCH_FEEDBACK_URL`` (the feedback
store, any SQLAlchemy URL), ``IMGSEARCH_PROFILE`` (a ``configs/profiles/NAME.yaml`` overlay).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

# MLflow draws a progress bar in the server's terminal for every model file it downloads
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

st.set_page_config(page_title="imgsearch", layout="wide")
st.title("imgsearch")

# `streamlit run` puts app/ on sys.path, not the repository root that holds `registry`.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

if "app.search_view" not in sys.modules:  # imported once per process
    with st.spinner("Loading the search engine (PyTorch, MLflow)..."):
        from app import search_view
else:
    from app import search_view

search_view.main()
