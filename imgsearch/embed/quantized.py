"""The mapper of batch extraction for an int8 extractor (:mod:`imgsearch.models.quantize`).

Same contract as :class:`~imgsearch.embed.mapper.Mapper` (uint8 pixels -> unit-norm float32
embeddings, :meth:`session` around the pass, ``metrics``), so every runner takes it unchanged;
:func:`imgsearch.embed.extract.build_runner` picks it for a
:class:`~imgsearch.models.quantize.QuantizedExtractor`. There is nothing to decide on the first
batch: whether int8 is good enough was settled before (:mod:`imgsearch.evaluate.int8`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from imgsearch.data.preprocess import to_tensor
from imgsearch.embed.mapper import Mapper
from imgsearch.models.quantize import QuantizedExtractor


class QuantizedMapper(Mapper):
    """uint8 batch -> int8 model (ONNX Runtime) -> ``(B, D)`` float32 unit vectors.

    ``Mapper.__init__`` is not called: it prepares a torch module (device, bf16, compile), and
    there is none here. The ORT session takes torch's intra-op thread count at :meth:`session`
    (what the runner's caller set, e.g. :func:`imgsearch.embed.extract.extract`).
    """

    def __init__(self, quantized: QuantizedExtractor) -> None:
        self.quantized = quantized
        self.preprocess = quantized.spec.preprocess
        self.device = torch.device("cpu")
        self.memory_format = torch.contiguous_format
        self.decided = True
        self.metrics = {
            "bf16_used": 0.0,
            "compile_used": 0.0,
            "int8_used": 1.0,
            "precision_used": "int8",
        }

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self.quantized.set_threads(torch.get_num_threads())
        with torch.inference_mode():
            yield

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """``(B, S, S, 3)`` uint8 -> ``(B, D)`` float32 (call inside :meth:`session`)."""
        return self.quantized(to_tensor(pixels, self.preprocess)).numpy()
