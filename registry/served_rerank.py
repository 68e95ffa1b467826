"""The champion reranker inside the HTTP-served index model (``imgsearch serve``).

The page and the CLI rerank in their own process (:func:`registry.search.load_served`). The
HTTP server runs only the index pyfunc, so ``imgsearch serve`` *bundles* the reranker into the
registry-checked copy of the index version it serves (:func:`bundle_reranker`):

1. it resolves ``imgsearch-reranker@champion`` through the registry and refuses (serves the
   first stage alone, saying why) a version trained for another index version, exactly as the
   page does (:func:`registry.reranker_model.check_index`), or one whose bytes fail their
   checksums (:func:`registry.integrity.download_verified`);
2. it copies that version's ``reranker/`` files into the copy as the artifact ``reranker`` and
   writes, into the copy's ``MLmodel`` config, ``reranker_version`` and the registry's
   checksums of every artifact (the index version's and the reranker's), so ``load_context``
   checks each file against the registry right before parsing it.

:class:`ServedReranker` is the index pyfunc's side: with a ``reranker`` artifact it asks the
first stage for ``max(k, RERANK_DEPTH)`` candidates, reorders them with the learned reranker,
keeps the top ``k`` and answers ``first_rank`` and ``rerank_score`` beside ``score`` and
``similarity``. Without one (a plain ``mlflow models serve``, ``imgsearch serve --no-reranker``,
no champion reranker for this index version) nothing changes.

An index version registered before this module existed ships code that ignores the artifact;
:func:`bundle_reranker` checks for this module in the copy's ``code/`` and says so instead of
bundling a reranker that would silently not run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from imgsearch.search.reranker import LearnedReranker

log = logging.getLogger(__name__)

#: the artifact name, in the reranker version and in the served copy of the index version
ARTIFACT_RERANKER = "reranker"
#: candidates the first stage returns for the reranker to order (what it was trained on)
RERANK_DEPTH = 20
VERSION_KEY = "reranker_version"
_FLAVOR = "python_function"


class ServedReranker:
    """A loaded learned reranker and its registry version, inside the index pyfunc."""

    def __init__(self, reranker: LearnedReranker, version: str | None) -> None:
        self.reranker = reranker
        self.version = version

    @classmethod
    def from_context(cls, context: Any) -> ServedReranker | None:
        """The bundled reranker of a served copy, or None when the copy has none. Its files
        must already have been checked (``verify_loaded``) by the caller."""
        artifacts = getattr(context, "artifacts", None) or {}
        if ARTIFACT_RERANKER not in artifacts:
            return None
        config = dict(getattr(context, "model_config", None) or {})
        version = config.get(VERSION_KEY)
        model = cls(
            LearnedReranker.load(Path(artifacts[ARTIFACT_RERANKER])),
            None if version in (None, "") else str(version),
        )
        log.info("reranking with imgsearch-reranker v%s", model.version or "?")
        return model

    @staticmethod
    def depth(k: int) -> int:
        return max(int(k), RERANK_DEPTH)

    def apply(self, hits: pd.DataFrame, k: int) -> pd.DataFrame:
        """First-stage hits (``depth(k)`` per query) reordered per query, cut to ``k``."""
        return rerank_top(self.reranker, hits, k)


def rerank_top(reranker: LearnedReranker, hits: pd.DataFrame, k: int) -> pd.DataFrame:
    """``hits`` reordered per ``query`` by ``reranker`` and cut to ``k``; rows without a rank
    (a query's error row) are kept as they are."""
    answered = hits[hits["rank"].notna()] if "rank" in hits.columns else hits
    if answered.empty:
        return hits
    out = reranker.rerank(answered.assign(rank=answered["rank"].astype(int)))
    out = out[out["rank"] <= int(k)]
    rest = hits.drop(index=answered.index)
    return pd.concat([out, rest], ignore_index=True) if not rest.empty else out


# --- imgsearch serve: bundling ------------------------------------------------------------------


def _pyfunc_conf(mlmodel: dict[str, Any]) -> dict[str, Any]:
    conf = mlmodel.get("flavors", {}).get(_FLAVOR)
    if not isinstance(conf, dict):
        raise ValueError("not a pyfunc model (no python_function flavor in MLmodel)")
    return conf


def _read_mlmodel(model_dir: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return data if isinstance(data, dict) else {}


def _write_mlmodel(model_dir: Path, data: dict[str, Any]) -> None:
    import yaml

    (Path(model_dir) / "MLmodel").write_text(yaml.safe_dump(data, sort_keys=False))


def downloaded_version(model_dir: Path) -> str | None:
    """The version MLflow recorded beside a model it downloaded by ``models:/<name>/<version>``."""
    import yaml

    meta = Path(model_dir) / "registered_model_meta"
    if not meta.is_file():
        return None
    version = (yaml.safe_load(meta.read_text()) or {}).get("model_version")
    return None if version in (None, "") else str(version)


def supports_reranker(model_dir: Path) -> bool:
    """Whether the code a model version ships knows the ``reranker`` artifact (this module)."""
    return (Path(model_dir) / "code" / "registry" / "served_rerank.py").is_file()


def pin_checksums(model_dir: Path, checksums: dict[str, str]) -> None:
    """Write the registry's per-file checksums into a served copy's model config, so its
    ``load_context`` checks each file before parsing it (as a ``load_verified`` load does)."""
    from registry.integrity import CONFIG_KEY

    data = _read_mlmodel(model_dir)
    conf = _pyfunc_conf(data)
    conf.setdefault("config", {})[CONFIG_KEY] = json.dumps(checksums, sort_keys=True)
    _write_mlmodel(model_dir, data)


def bundle_reranker(
    model_dir: Path,
    index_version: str,
    checksums: dict[str, str],
    *,
    alias: str = "champion",
    client: Any = None,
) -> tuple[str | None, str]:
    """Put ``imgsearch-reranker@alias`` into the served copy ``model_dir`` of ``index_version``
    (module docstring). ``checksums``: the index version's per-file checksums (from
    ``download_verified``). Returns (the reranker version or None, a line saying what was done
    or why not); the copy's checksums are pinned either way."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from imgsearch.errors import ImgsearchError
    from registry import reranker_model
    from registry.integrity import download_verified

    client = client or MlflowClient()
    name = reranker_model.RERANKER_MODEL
    pinned = dict(checksums)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        pin_checksums(model_dir, pinned)
        return None, f"no {name}@{alias}: first-stage ranking only (`make rerank` trains one)"
    try:
        reranker_model.check_index(mv, index_version)
        if not supports_reranker(model_dir):
            raise ImgsearchError(
                f"index v{index_version} was registered by code that predates served "
                "reranking: re-register it (`make demo` or the register step) to serve reranked"
            )
        with tempfile.TemporaryDirectory(prefix="imgsearch-reranker-") as tmp:
            local, files = download_verified(
                f"models:/{name}/{mv.version}", Path(tmp), client=client
            )
            art = _pyfunc_conf(_read_mlmodel(local)).get("artifacts", {}).get(ARTIFACT_RERANKER)
            if not art:
                raise ImgsearchError(f"{name} v{mv.version} has no {ARTIFACT_RERANKER} artifact")
            rel = f"artifacts/{ARTIFACT_RERANKER}"
            if (Path(model_dir) / rel).exists():
                raise ImgsearchError(f"the served copy already has {rel}")
            shutil.copytree(Path(local) / art["path"], Path(model_dir) / rel)
    except ImgsearchError as exc:  # RerankerMismatchError, ArtifactIntegrityError, the above
        pin_checksums(model_dir, pinned)
        return None, f"{name}@{alias} v{mv.version} not used: {exc}"
    prefix = f"sha256.{ARTIFACT_RERANKER}/"
    pinned |= {k: v for k, v in files.items() if k.startswith(prefix)}
    data = _read_mlmodel(model_dir)
    conf = _pyfunc_conf(data)
    conf.setdefault("artifacts", {})[ARTIFACT_RERANKER] = {"path": rel}
    config = conf.setdefault("config", {})
    config[VERSION_KEY] = str(mv.version)
    _write_mlmodel(model_dir, data)
    pin_checksums(model_dir, pinned)
    return str(mv.version), f"reranked by {name} v{mv.version} (@{alias})"
