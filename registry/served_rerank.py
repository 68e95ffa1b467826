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

from imgsearch.errors import ConfigError
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
        bundled = bundled_artifact(context, ARTIFACT_RERANKER, VERSION_KEY)
        if bundled is None:
            return None
        path, version = bundled
        reranker = LearnedReranker.load(path)
        if reranker.cfg.attributes:  # bundle_reranker never bundles one; refuse, never guess
            raise ConfigError("a reranker trained with attribute_agreement cannot be served here")
        model = cls(reranker, version)
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


def _downloaded_meta(model_dir: Path) -> dict[str, Any]:
    import yaml

    meta = Path(model_dir) / "registered_model_meta"
    data = yaml.safe_load(meta.read_text()) if meta.is_file() else None
    return data if isinstance(data, dict) else {}


def downloaded_version(model_dir: Path) -> str | None:
    """The version MLflow recorded beside a model it downloaded by ``models:/<name>/<version>``."""
    version = _downloaded_meta(model_dir).get("model_version")
    return None if version in (None, "") else str(version)


def downloaded_name(model_dir: Path) -> str:
    """The registered name recorded beside a downloaded model (default: the index model's)."""
    return str(_downloaded_meta(model_dir).get("model_name") or "imgsearch-index")


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


def add_artifact(model_dir: Path, name: str, source: Path, config: dict[str, str]) -> None:
    """Copy ``source`` into a served copy as artifact ``name`` and set ``config`` keys."""
    rel = f"artifacts/{name}"
    if (Path(model_dir) / rel).exists():
        raise FileExistsError(f"the served copy already has {rel}")
    shutil.copytree(source, Path(model_dir) / rel)
    data = _read_mlmodel(model_dir)
    conf = _pyfunc_conf(data)
    conf.setdefault("artifacts", {})[name] = {"path": rel}
    conf.setdefault("config", {}).update(config)
    _write_mlmodel(model_dir, data)


def bundled_artifact(context: Any, name: str, version_key: str) -> tuple[Path, str | None] | None:
    """In a pyfunc's ``load_context``: where the artifact ``name`` that :func:`add_artifact`
    bundled into a served copy lives, and the registry version its ``version_key`` config
    records (None when unrecorded); None when the copy has no such artifact."""
    artifacts = getattr(context, "artifacts", None) or {}
    if name not in artifacts:
        return None
    config = dict(getattr(context, "model_config", None) or {})
    version = config.get(version_key)
    return Path(artifacts[name]), None if version in (None, "") else str(version)


def artifact_dir(model_dir: Path, name: str) -> Path | None:
    """Where artifact ``name`` of a (downloaded) pyfunc model lives, or None."""
    art = _pyfunc_conf(_read_mlmodel(model_dir)).get("artifacts", {}).get(name)
    return Path(model_dir) / art["path"] if art else None


def bundle_reranker(
    model_dir: Path, index_version: str, *, alias: str = "champion", client: Any = None
) -> tuple[str | None, str, dict[str, str]]:
    """Put ``imgsearch-reranker@alias`` into the served copy ``model_dir`` of ``index_version``
    (module docstring). Returns (the reranker version or None, a line saying what was done or
    why not, the registry's checksums of the bundled files)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from imgsearch.errors import ImgsearchError
    from registry import reranker_model
    from registry.integrity import download_verified

    client = client or MlflowClient()
    name = reranker_model.RERANKER_MODEL
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, f"no {name}@{alias}: first-stage ranking only (`make rerank` trains one)", {}
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
            source = artifact_dir(local, ARTIFACT_RERANKER)
            if source is None:
                raise ImgsearchError(f"{name} v{mv.version} has no {ARTIFACT_RERANKER} artifact")
            if LearnedReranker.load(source).cfg.attributes:
                raise ImgsearchError(
                    "it was trained with attribute_agreement, which the served index model "
                    "does not compute: retrain it without attributes to serve it"
                )
            add_artifact(model_dir, ARTIFACT_RERANKER, source, {VERSION_KEY: str(mv.version)})
    except (ImgsearchError, FileExistsError) as exc:  # RerankerMismatchError, checksums, ...
        return None, f"{name}@{alias} v{mv.version} not used: {exc}", {}
    prefix = f"sha256.{ARTIFACT_RERANKER}/"
    pinned = {k: v for k, v in files.items() if k.startswith(prefix)}
    return str(mv.version), f"reranked by {name} v{mv.version} (@{alias})", pinned


def prepare_copy(
    model_dir: Path,
    checksums: dict[str, str],
    *,
    reranker_alias: str | None = "champion",
    attributes_alias: str | None = "champion",
    client: Any = None,
) -> list[str]:
    """Everything ``imgsearch serve`` adds to its checked copy of an index version: the
    reranker and the attribute heads of that version (``None`` alias: not), then the registry's
    checksums of every file pinned into the copy's config. Returns one line per addition."""
    from registry import bundled_attributes

    pinned = dict(checksums)
    lines = []
    version = downloaded_version(model_dir)
    if version is None:
        lines.append("the served version is unknown: nothing bundled")
    else:
        if reranker_alias:
            _, line, extra = bundle_reranker(
                model_dir, version, alias=reranker_alias, client=client
            )
            lines.append(line)
            pinned |= extra
        if attributes_alias:
            _, line, extra = bundled_attributes.bundle_attributes(
                model_dir, version, alias=attributes_alias, client=client
            )
            lines.append(line)
            pinned |= extra
    pin_checksums(model_dir, pinned)
    return lines
