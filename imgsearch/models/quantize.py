"""int8 feature extractors: ONNX Runtime static quantisation, calibrated on catalog images.

    q = quantize(extractor, calibration)  # calibration: (N, 3, S, S) float, normalised per spec
    emb = q(x)                            # like extractor(x): (N, D) float32, unit L2 norm

The body (backbone + global pooling) is exported to ONNX (``torch.onnx.export``, dynamo, dynamic
batch), run through ORT's ``quant_pre_process`` (shape inference, graph optimisation) and quantised
by ``quantize_static``: QDQ format, per-channel int8 weights, uint8 activations whose ranges are
calibrated (min/max by default) on ``calibration``. The head (when the extractor keeps one) and
the L2 normalisations stay in torch fp32: they are a few hundred kFLOPs next to the body's GFLOPs.

Why ORT and not torch (``benchmarks/bench_int8.py``, 2 cores with AVX512-VNNI, ResNet50 @ 224):
ORT's uint8 x int8 QDQ kernels ran the extract pipeline at 4.5-5.6x its fp32 throughput and
single queries at 5.6x eager fp32 on one thread, with a min cosine of 0.9998 to fp32. Signed int8 activations
(S8S8) were slower than ORT's own fp32 here: uint8 activations are what the VNNI kernels take.
torchao 0.18's PT2E ``X86InductorQuantizer`` could not annotate ResNet50 on torch 2.14.1
(``ValueError: Input partition has more than one output node`` at the conv + add + relu of each
residual block), and its converted graph needs ``torch.compile`` (inductor, a C++ compiler and
minutes of compiling) to be faster than fp32 at all. The FX path (``torch.ao.quantization``) is
deprecated; :mod:`imgsearch.search.query`'s ``int8`` serving mode used it and now uses this module.

Whether the int8 vectors are good enough is not decided here: that is retrieval quality, see
:func:`imgsearch.evaluate.quantization.quality_check`.

Raises :class:`QuantizationUnavailableError` when ``onnxruntime``/``onnx``/``onnxscript`` are not
installed, and :class:`QuantizationError` when export or quantisation fails.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.models.backbones import Extractor, ExtractorSpec, embed_pooled

log = logging.getLogger(__name__)

ACTIVATIONS = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
INSTALL_HINT = "pip install onnxruntime onnx onnxscript (imgsearch's dependencies list them)"


class QuantizationError(ImgsearchError):
    """An extractor cannot be exported to ONNX or quantised."""


class QuantizationUnavailableError(QuantizationError):
    """ONNX Runtime (or onnx / onnxscript, needed to export) is not installed."""


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, after checking ``onnx`` and ``onnxscript`` import too.

    Raises :class:`QuantizationUnavailableError` naming what is missing and how to install it.
    """
    missing = []
    for name in ("onnxruntime", "onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise QuantizationUnavailableError(
            f"int8 extraction needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )
    import onnxruntime

    return onnxruntime


@dataclass(frozen=True)
class QuantizeConfig:
    """How :func:`quantize` quantises.

    ``activation``: ``uint8`` (U8S8: what the x86 VNNI kernels take; measured faster) or ``int8``.
    ``per_channel``: one weight scale per output channel (keeps depthwise convolutions usable).
    ``calibration_method``: ORT's ``minmax`` | ``entropy`` | ``percentile``.
    ``batch_size``: calibration images per ORT run.
    """

    activation: str = "uint8"
    per_channel: bool = True
    calibration_method: str = "minmax"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"quantize.activation must be one of {ACTIVATIONS}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"quantize.calibration_method must be one of {CALIBRATION_METHODS}")
        if self.batch_size < 1:
            raise ConfigError("quantize.batch_size must be >= 1")


class _Features(nn.Module):
    """The body with the extractor's pooling: ``(N, 3, S, S)`` -> ``(N, D)`` float (unnormalised)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        if features.ndim != 2:
            features = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return features.float()


def export_onnx(extractor: Extractor, path: Path) -> Path:
    """Export ``extractor``'s body (with pooling) to ONNX at ``path``, batch dimension dynamic."""
    require_onnxruntime()
    size = extractor.spec.preprocess.size
    module = _Features(copy.deepcopy(extractor.body).float().cpu().eval())
    module = module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - export fails in many ways on custom backbones
        raise QuantizationError(
            f"cannot export {extractor.spec.name!r} to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    return Path(path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter prints its progress to stdout and warns per op: keep it out of logs."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Calibration:
    """ORT's ``CalibrationDataReader`` protocol over a float tensor, ``batch_size`` rows at a time."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self.batches = iter(
            np.ascontiguousarray(images[i : i + batch_size].float().numpy())
            for i in range(0, len(images), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize(
    extractor: Extractor,
    calibration: torch.Tensor,
    cfg: QuantizeConfig | None = None,
    *,
    threads: int = 0,
) -> QuantizedExtractor:
    """Static int8 quantisation of ``extractor``'s body, calibrated on ``calibration``.

    ``calibration``: ``(N, 3, S, S)`` float images preprocessed per ``extractor.spec.preprocess``
    (catalog images, not noise: activation ranges come from them). ``threads``: ORT intra-op
    threads of the returned extractor (0: ORT's default, one per core).

    Raises :class:`QuantizationUnavailableError` without ONNX Runtime, ``ValueError`` on a
    calibration tensor of the wrong shape, :class:`QuantizationError` when export or
    quantisation fails.
    """
    cfg = cfg or QuantizeConfig()
    ort = require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    size = extractor.spec.preprocess.size
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != (3, size, size):
        raise ValueError(
            f"calibration must be (N, 3, {size}, {size}) preprocessed images, "
            f"got {tuple(calibration.shape)}"
        )
    if len(calibration) == 0:
        raise ValueError("calibration holds no images")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[cfg.calibration_method]
    activation = QuantType.QUInt8 if cfg.activation == "uint8" else QuantType.QInt8
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgsearch-int8-") as tmp:
        fp32 = export_onnx(extractor, Path(tmp) / "fp32.onnx")
        pre, int8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            with _quiet():
                quant_pre_process(str(fp32), str(pre))
                quantize_static(
                    str(pre),
                    str(int8),
                    _Calibration(calibration, cfg.batch_size),
                    quant_format=QuantFormat.QDQ,
                    per_channel=cfg.per_channel,
                    activation_type=activation,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                )
        except Exception as exc:  # noqa: BLE001 - ORT raises many types for unsupported graphs
            raise QuantizationError(
                f"ONNX Runtime could not quantise {extractor.spec.name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        model = int8.read_bytes()
    log.info(
        "quantised %s to int8 on %d calibration images in %.1f s (onnxruntime %s)",
        extractor.spec.name,
        len(calibration),
        time.perf_counter() - start,
        ort.__version__,
    )
    head = (
        copy.deepcopy(extractor.head).float().cpu().eval() if extractor.head is not None else None
    )
    return QuantizedExtractor(extractor.spec, model, head, threads=threads, cfg=cfg)


class QuantizedExtractor:
    """An int8 extractor: called like :class:`~imgsearch.models.backbones.Extractor`.

    ``spec`` is the fp32 extractor's (same preprocessing, same embedding size); ``onnx_model``
    the quantised body as ONNX bytes; ``head`` the fp32 head, or None. An ORT session is made on
    first use with ``threads`` intra-op threads (:meth:`set_threads` changes it).
    """

    precision = "int8"

    def __init__(
        self,
        spec: ExtractorSpec,
        onnx_model: bytes,
        head: nn.Module | None = None,
        *,
        threads: int = 0,
        cfg: QuantizeConfig | None = None,
    ) -> None:
        self.spec = spec
        self.onnx_model = onnx_model
        self.head = head
        self.threads = threads
        self.cfg = cfg or QuantizeConfig()
        self._session: Any = None

    def set_threads(self, threads: int) -> None:
        """Intra-op threads of the ORT session (0: one per core); rebuilt on next call if changed."""
        if threads != self.threads:
            self.threads = threads
            self._session = None

    @property
    def session(self) -> Any:
        if self._session is None:
            ort = require_onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(
                self.onnx_model, options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def features(self, x: torch.Tensor) -> np.ndarray:
        """``(N, 3, S, S)`` float -> the body's pooled ``(N, D)`` features (int8 arithmetic)."""
        pixels = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, 3, S, S)`` float, normalised per ``spec.preprocess`` -> ``(N, D)`` float32,
        unit L2 norm (head applied in fp32 as :class:`Extractor` does)."""
        emb = F.normalize(torch.from_numpy(self.features(x)).float(), dim=1)
        with torch.inference_mode():
            return embed_pooled(emb, self.head, self.spec.backbone_weight)

    def save(self, path: Path) -> Path:
        """Write the quantised body as an ``.onnx`` file (the head, if any, is not in it)."""
        Path(path).write_bytes(self.onnx_model)
        return Path(path)
