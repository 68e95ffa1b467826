"""The query-time forward pass: how many threads, and which (checked) speed-ups.

**Threads.** A served model answers one small query at a time. With more runnable processes than
cores (a shared 2-core host), OpenMP's spinning workers wait for each other at every layer, and a
second intra-op thread made single-query latency about 10x worse under load while gaining little
when idle (``benchmarks/bench_serving.py`` prints both). So serving defaults to
:data:`DEFAULT_THREADS` = 1 thread per query; scale out with more server workers instead.
``$IMGSEARCH_TORCH_THREADS`` (or the model config ``torch_threads``) sets another count; ``0``
leaves torch's own default (one thread per core). :func:`torch_threads` applies the count around
one call and restores the caller's, so an in-process user (the search page, the CLI, tests) keeps
its own setting.

**Modes** (``$IMGSEARCH_SERVING_MODE`` or the model config ``serving_mode``):

- ``eager``: the extractor as trained, fp32.
- ``fused`` (default): BatchNorm folded into the preceding convolutions (``torch.fx``) and
  channels-last weights, so oneDNN runs its NHWC kernels. The same arithmetic up to rounding;
  kept only if it reproduces eager fp32 to cosine >= :data:`FUSED_MIN_COSINE` on probe images.
- ``int8``: ONNX Runtime post-training static quantisation (QDQ, per-channel int8 weights,
  uint8 activations; :mod:`imgsearch.models.quantize`), calibrated on gallery images
  (:class:`Int8Images`). Kept only where it keeps retrieval quality: images of whole gallery
  items (not the calibration ones) are embedded in fp32 and in int8 and searched through the
  index itself (every gallery image a distractor, the query's own row left out), and the MAP@R of
  the int8 queries must be within ``tolerance`` of the fp32 queries'
  (:func:`imgsearch.evaluate.quantization.searched_check`). Without an index to search (a bare
  list of images), the two embeddings are compared among the check images
  (:func:`~imgsearch.evaluate.quantization.quality_check`, extraction's check). A
  cosine says how far vectors moved, not whether the ranking survived: it is recorded
  (``int8_min_cosine``), it does not decide. Otherwise ``fused``, the reason in ``int8_error``
  (too few images, no item with two images to measure on, the check failed, ONNX Runtime
  missing). Opt in where the latency matters more. (It replaced torch's FX quantisation,
  deprecated with PyTorch's quantised tensors.)

:func:`embed_images` is the plain reference of the query path (eval mode, fp32): the same
``to_uint8`` -> ``to_tensor`` -> extractor as batch extraction; :class:`ServingExtractor` gives what
it gives, up to the recorded cosine (fused) or the checked MAP@R (int8).

bf16 and ``torch.compile`` are not offered here: on CPUs without native bf16 (no AVX512-BF16 or
AMX) bf16 is emulated and slower, and compiled ResNet50 was slower than eager on one thread after
a minute of compiling (figures in the README).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgsearch.data.preprocess import images_to_tensor, to_tensor
from imgsearch.embed.mapper import min_cosine
from imgsearch.errors import ConfigError
from imgsearch.evaluate.quantization import (
    DEFAULT_TOLERANCE,
    Search,
    quality_check,
    searched_check,
)
from imgsearch.models.backbones import Extractor
from imgsearch.models.quantize import QuantizedExtractor, quantize

log = logging.getLogger(__name__)

THREADS_ENV = "IMGSEARCH_TORCH_THREADS"
MODE_ENV = "IMGSEARCH_SERVING_MODE"
DEFAULT_THREADS = 1
MODES = ("eager", "fused", "int8")
DEFAULT_MODE = "fused"
#: Folding BN and reordering memory change only rounding.
FUSED_MIN_COSINE = 0.9999
#: Fewest gallery images int8 calibrates on.
INT8_MIN_CALIBRATION = 4
PROBE_IMAGES = 2


def resolve_threads(configured: Any = None, env: Mapping[str, str] | None = None) -> int:
    """Threads per query: ``$IMGSEARCH_TORCH_THREADS``, else ``configured``, else 1; 0 = torch's
    default. Raises :class:`ConfigError` on a value that is not a non-negative integer."""
    env = os.environ if env is None else env
    raw = env.get(THREADS_ENV) or configured
    if raw is None or raw == "":
        return DEFAULT_THREADS
    try:
        value = int(str(raw).strip())
    except ValueError as exc:
        raise ConfigError(f"torch threads must be an integer >= 0, got {raw!r}") from exc
    if value < 0:
        raise ConfigError(f"torch threads must be an integer >= 0, got {raw!r}")
    return value


def resolve_mode(configured: Any = None, env: Mapping[str, str] | None = None) -> str:
    """``$IMGSEARCH_SERVING_MODE``, else ``configured``, else :data:`DEFAULT_MODE`."""
    env = os.environ if env is None else env
    mode = str(env.get(MODE_ENV) or configured or DEFAULT_MODE).strip().lower()
    if mode not in MODES:
        raise ConfigError(f"serving mode must be one of {MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (0: unchanged), then restore."""
    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def embed_images(
    extractor: Extractor, images: Sequence[Image.Image], *, batch_size: int = 64
) -> np.ndarray:
    """Embed decoded images (``open_rgb`` output, or any PIL image) -> ``(N, D)`` float32, unit norm.

    Same preprocessing as batch extraction (``to_uint8`` then ``to_tensor``), fp32, eval mode.
    """
    pre = extractor.spec.preprocess
    out = np.empty((len(images), extractor.spec.embedding_dim), dtype=np.float32)
    device = next(extractor.parameters()).device
    was_training = extractor.training
    extractor.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                x = images_to_tensor(chunk, pre).to(device)
                out[start : start + len(chunk)] = extractor(x).float().cpu().numpy()
    finally:
        extractor.train(was_training)
    return out


def _pixels(images: Sequence[Image.Image], extractor: Extractor) -> torch.Tensor:
    return images_to_tensor(images, extractor.spec.preprocess)


@dataclass(frozen=True)
class Int8Images:
    """Decoded gallery images for serving's int8: ``calibration`` to quantise on, ``check`` (whole
    items, ``labels`` their item ids) to compare MAP@R on; ``tolerance``: the largest MAP@R drop
    that keeps int8. With ``search`` (the index's), ``own`` (each check image's gallery
    position) and ``gallery_labels`` (the item of every gallery position), the check queries
    are ranked through the index, as served; without, among the check images."""

    calibration: Sequence[Image.Image] = ()
    check: Sequence[Image.Image] = ()
    labels: Sequence[str] = ()
    tolerance: float = DEFAULT_TOLERANCE
    own: Sequence[int] = ()
    gallery_labels: Sequence[str] = ()
    search: Search | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.check):
            raise ValueError(f"{len(self.labels)} labels for {len(self.check)} check images")
        if self.search is not None and len(self.own) != len(self.check):
            raise ValueError(f"{len(self.own)} gallery positions for {len(self.check)} images")


@dataclass
class ServingExtractor:
    """An extractor prepared for queries: :meth:`embed` gives what ``embed_images`` gives (to the
    recorded cosine) with the chosen speed-up. ``extractor`` stays the unmodified original (its
    fingerprint is what the index was built with)."""

    extractor: Extractor
    model: Callable[[torch.Tensor], torch.Tensor]  # the extractor, a fused copy, or int8 (ORT)
    mode: str
    memory_format: torch.memory_format = torch.contiguous_format
    threads: int = DEFAULT_THREADS
    metrics: dict[str, Any] = field(default_factory=dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.contiguous(memory_format=self.memory_format)).float()

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Decoded RGB images -> ``(N, D)`` float32 unit vectors."""
        out = np.empty((len(images), self.extractor.spec.embedding_dim), dtype=np.float32)
        with torch_threads(self.threads):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                emb = self.forward(_pixels(chunk, self.extractor))
                out[start : start + len(chunk)] = nn.functional.normalize(emb, dim=1).numpy()
        return out


def _wrap(extractor: Extractor, body: nn.Module) -> Extractor:
    """The extractor's forward (pooling, normalisation, head) around a transformed body."""
    head = copy.deepcopy(extractor.head) if extractor.head is not None else None
    return Extractor(body, extractor.spec, head).eval()


def fuse(extractor: Extractor) -> Extractor:
    """BN folded into convolutions (``torch.fx``), channels-last weights. Raises when the body
    cannot be traced symbolically (e.g. data-dependent control flow)."""
    from torch.fx.experimental.optimization import fuse as fx_fuse

    body = fx_fuse(copy.deepcopy(extractor.body).eval())
    return _wrap(extractor, body).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def quantize_int8(
    extractor: Extractor, calibration: torch.Tensor, threads: int = DEFAULT_THREADS
) -> QuantizedExtractor:
    """ONNX Runtime static int8 quantisation (:func:`imgsearch.models.quantize.quantize`),
    calibrated on ``calibration`` (preprocessed ``(N, 3, S, S)`` gallery images); its session
    runs ``threads`` intra-op threads (0: one per core)."""
    return quantize(extractor, calibration, threads=threads)


def _probe(extractor: Extractor, n: int = PROBE_IMAGES) -> torch.Tensor:
    """Deterministic synthetic inputs in the extractor's preprocessing (for the lossless check)."""
    size = extractor.spec.preprocess.size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return to_tensor(pixels, extractor.spec.preprocess)


def prepare_serving(
    extractor: Extractor,
    mode: str = DEFAULT_MODE,
    *,
    threads: int = DEFAULT_THREADS,
    gallery: Int8Images | None = None,
) -> ServingExtractor:
    """The extractor ready for queries in ``mode`` (see the module docstring), each speed-up kept
    only when it passes its check against eager fp32 (``fused``: cosine; ``int8``: MAP@R);
    otherwise the next safer mode. ``gallery``: the images ``int8`` calibrates and checks on.

    ``metrics`` records the mode asked for and used, each check's figures and why a mode was
    dropped.
    """
    if mode not in MODES:
        raise ConfigError(f"serving mode must be one of {MODES}, got {mode!r}")
    extractor = extractor.eval()
    metrics: dict[str, Any] = {"mode_requested": mode}
    served = ServingExtractor(extractor, extractor, "eager", threads=threads, metrics=metrics)
    if mode == "eager":
        metrics["mode"] = "eager"
        return served
    with torch_threads(threads):
        if mode == "int8":
            int8 = _try_int8(extractor, gallery, metrics, threads)
            if int8 is not None:
                served.model, served.mode = int8, "int8"
                metrics["mode"] = "int8"
                return served
        fused = _try_fused(extractor, metrics)
        if fused is not None:
            served.model, served.mode = fused, "fused"
            served.memory_format = torch.channels_last
    metrics["mode"] = served.mode
    return served


def _try_fused(extractor: Extractor, metrics: dict[str, Any]) -> nn.Module | None:
    try:
        fused = fuse(extractor)
        x = _probe(extractor)
        with torch.inference_mode():
            cosine = min_cosine(
                extractor(x), fused(x.contiguous(memory_format=torch.channels_last))
            )
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways on custom backbones
        log.warning("fused serving path unavailable (%s: %s); eager", type(exc).__name__, exc)
        metrics["fused_error"] = f"{type(exc).__name__}: {exc}"
        return None
    metrics["fused_min_cosine"] = cosine
    if cosine < FUSED_MIN_COSINE:
        log.warning("fused path min cosine %.6f < %s; eager", cosine, FUSED_MIN_COSINE)
        return None
    return fused


def _try_int8(
    extractor: Extractor, gallery: Int8Images | None, metrics: dict[str, Any], threads: int
) -> QuantizedExtractor | None:
    gallery = gallery or Int8Images()
    if len(gallery.calibration) < INT8_MIN_CALIBRATION or len(gallery.check) < 2:
        _refuse_int8(
            metrics,
            f"{len(gallery.calibration)} gallery images to calibrate on and {len(gallery.check)} "
            f"to check on; {INT8_MIN_CALIBRATION} and 2 (of one item) needed",
        )
        return None
    try:
        int8 = quantize_int8(extractor, _pixels(gallery.calibration, extractor), threads)
        reference = ServingExtractor(extractor, extractor, "eager", threads=threads)
        quantized = ServingExtractor(extractor, int8, "int8", threads=threads)
        fp32_emb, int8_emb = reference.embed(gallery.check), quantized.embed(gallery.check)
    except Exception as exc:  # noqa: BLE001 - an op without a quantised kernel, a backend missing
        _refuse_int8(metrics, f"{type(exc).__name__}: {exc}")
        return None
    if gallery.search is not None:
        result = searched_check(
            fp32_emb,
            int8_emb,
            gallery.own,
            gallery.gallery_labels,
            gallery.search,
            gallery.tolerance,
        )
    else:
        result = quality_check(
            fp32_emb, int8_emb, list(gallery.labels), gallery.tolerance, int8_queries=True
        )
    metrics["int8_checked_on"] = "index" if gallery.search is not None else "check images"
    for key in ("map_at_r_fp32", "map_at_r_int8", "map_at_r_mixed", "map_at_r_drop"):
        if key in result:
            metrics[f"int8_{key}"] = result[key]
    metrics["int8_min_cosine"] = result["min_cosine"]
    metrics["int8_check_images"] = len(gallery.check)
    metrics["int8_calibration_images"] = len(gallery.calibration)
    metrics["int8_reason"] = result["reason"]
    if not result["keep"]:
        _refuse_int8(metrics, result["reason"])
        return None
    log.info("int8 kept: %s", result["reason"])
    return int8


def _refuse_int8(metrics: dict[str, Any], reason: str) -> None:
    log.warning("int8 not used: %s", reason)
    metrics["int8_error"] = reason
