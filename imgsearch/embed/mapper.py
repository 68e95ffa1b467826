"""The mapper of batch extraction: uint8 pixels -> unit-norm float32 embeddings.

:func:`imgsearch.data.preprocess.to_tensor` then the extractor, under ``torch.inference_mode``,
channels-last, optionally bf16 autocast and ``torch.compile``. Both are checked on the first batch
against plain fp32 (cosine >= :data:`BF16_MIN_COSINE` / :data:`COMPILE_MIN_COSINE`; bf16 must also
be faster) and dropped, with a metric saying so, when they do not hold. Once the model is loaded
the mapping is pure: the same pixels give the same vectors whichever runner calls it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from imgsearch.data.preprocess import to_tensor
from imgsearch.models.backbones import Extractor

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
#: bf16 is kept only when every first-batch embedding stays this close to fp32's.
BF16_MIN_COSINE = 0.999
#: How many images of the first batch the bf16 trial runs on (emulated bf16 can be very slow).
BF16_PROBE_IMAGES = 4
#: torch.compile is kept only when it reproduces eager fp32 this closely on the first batch.
COMPILE_MIN_COSINE = 0.9999


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine between two ``(N, D)`` batches (how far a speed-up drifts)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min())


class Mapper:
    """uint8 batch -> unit-norm float32 embeddings; decides bf16/compile on its first batch.

    ``metrics`` records what was decided (``bf16_used``, ``compile_used``, ``precision_used`` and
    the trials' cosines and timings).
    """

    def __init__(
        self,
        extractor: Extractor,
        device: torch.device,
        *,
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        self.extractor = extractor
        self.preprocess = extractor.spec.preprocess
        self.precision = precision
        self.compile = compile
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model: Any = extractor
        self.bf16 = False
        self.decided = False
        self.metrics: dict[str, Any] = {
            "bf16_used": 0.0,
            "compile_used": 0.0,
            "precision_used": "fp32",
        }

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The extractor in eval mode on the device, in the memory format, under inference mode;
        restored afterwards (device, contiguous memory format, train/eval mode)."""
        extractor = self.extractor
        was_training = extractor.training
        original_device = next(extractor.parameters()).device
        try:
            extractor.eval().to(self.device).to(memory_format=self.memory_format)
            with torch.inference_mode():
                yield
        finally:
            extractor.to(original_device).to(memory_format=torch.contiguous_format)
            extractor.train(was_training)

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_tensor(pixels, self.preprocess)
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _forward(self, model: Any, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        return out.float()

    def _decide(self, x: torch.Tensor) -> torch.Tensor:
        """Run the first batch in fp32 eager (its result is what we keep) and try the options."""
        start = time.perf_counter()
        reference = self._forward(self.extractor, x, bf16=False)
        self.metrics["first_batch_fp32_s"] = time.perf_counter() - start
        if self.precision == "bf16":
            self.bf16 = self._try_bf16(x[:BF16_PROBE_IMAGES], reference[:BF16_PROBE_IMAGES])
        if self.compile:
            self._try_compile(x, reference)
        self.metrics["bf16_used"] = float(self.bf16)
        self.metrics["compile_used"] = float(self.model is not self.extractor)
        self.metrics["precision_used"] = "bf16" if self.bf16 else "fp32"
        self.decided = True
        return reference

    def _try_compile(self, x: torch.Tensor, reference: torch.Tensor) -> None:
        try:
            compiled = torch.compile(self.extractor)
            start = time.perf_counter()
            trial = self._forward(compiled, x, bf16=False)
            self.metrics["compile_s"] = time.perf_counter() - start
            cosine = min_cosine(reference, trial)
        except Exception as exc:  # noqa: BLE001 - backends fail in many ways (no compiler, ...)
            log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            compiled, cosine = None, float("nan")
        self.metrics["compile_min_cosine"] = cosine
        if compiled is not None and cosine >= COMPILE_MIN_COSINE:
            self.model = compiled
        else:
            log.warning("torch.compile not used (min cosine %.6f)", cosine)

    def _try_bf16(self, probe: torch.Tensor, reference: torch.Tensor) -> bool:
        """bf16 is kept when it is as accurate (cosine) *and* faster than fp32 on a few images:
        CPUs without native bf16 emulate it, many times slower than fp32."""
        try:
            cosine = min_cosine(reference, self._forward(self.extractor, probe, bf16=True))
        except RuntimeError as exc:  # an op without a bf16 kernel on this device
            log.warning("bf16 autocast failed (%s); using fp32", exc)
            cosine = float("nan")
        self.metrics["bf16_min_cosine"] = cosine
        if not cosine >= BF16_MIN_COSINE:
            log.warning("bf16 min cosine vs fp32 %.5f < %.3f: using fp32", cosine, BF16_MIN_COSINE)
            return False
        timings = {}
        for bf16 in (False, True):  # both warm now
            start = time.perf_counter()
            self._forward(self.extractor, probe, bf16=bf16)
            timings[bf16] = time.perf_counter() - start
        self.metrics["bf16_speedup"] = timings[False] / max(timings[True], 1e-9)
        if timings[True] >= timings[False]:
            log.warning(
                "bf16 is not faster than fp32 here (x%.2f): using fp32",
                self.metrics["bf16_speedup"],
            )
            return False
        return True

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """``(B, S, S, 3)`` uint8 -> ``(B, D)`` float32 (call inside :meth:`session`)."""
        x = self._input(pixels)
        out = self._decide(x) if not self.decided else self._forward(self.model, x, self.bf16)
        if self.bf16:  # autocast output re-normalised in fp32
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy()
