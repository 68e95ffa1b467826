"""Per-request decode bounds for query images, checked from image headers before any decoding.

A served model must not let one request decide how much memory and CPU it gets: eight 40 MP
PNGs fit in 1.4 MB of JSON but decode to about 1 GB of pixels. :class:`DecodeLimits` bounds rows
per request, pixels per image and decoded pixels per request; :func:`check_request` compares them
with the sizes declared in the headers (Pillow's ``Image.open`` parses only the header), so a
request over a limit is refused with its reason and nothing is decoded.

Images over ``reduce_above_pixels`` (but within the limits) are decoded at a reduced scale whose
shorter side stays at least ``decode_min_side`` (JPEG: ``draft``, DCT scaling while decoding;
others: ``Image.reduce`` right after decoding, see :func:`imgsearch.data.imageio.load_image`).
Images at or below ``reduce_above_pixels`` decode exactly as the indexed images did.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from imgsearch.data.imageio import ALLOWED_FORMATS, DECODE_ERRORS, SNIFF_BYTES, sniff_format
from imgsearch.errors import ConfigError, ImgsearchError

log = logging.getLogger(__name__)


class RequestTooLarge(ImgsearchError):
    """A request asks for more rows or decoded pixels than the limits allow."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds of one request. Defaults: a 24 MP camera frame per image, 64 MP per request (about
    190 MB of RGB if all were decoded fully), 32 rows; images over 16 MP (larger than a 12 MP
    phone photo) decode at a reduced scale, never below 896 px (4x a 224 px model input) on the
    shorter side."""

    max_rows: int = 32
    max_image_pixels: int = 24_000_000
    max_request_pixels: int = 64_000_000
    reduce_above_pixels: int = 16_000_000
    decode_min_side: int = 896

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DecodeLimits.{f.name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> DecodeLimits:
        """The limits named in a model config (other keys, e.g. ``torch_threads``, are not ours)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in (config or {}).items():
            if name in names and value is not None:
                try:
                    values[name] = int(value)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{name} must be an integer, got {value!r}") from exc
        return cls(**values)

    def as_config(self) -> dict[str, int]:
        """Plain dict, for a model's logged ``model_config``."""
        return dataclasses.asdict(self)

    def reduction(self, width: int, height: int) -> int:
        """Integer scale-down factor for an image of this size (1 = decode as is)."""
        if width * height <= self.reduce_above_pixels:
            return 1
        return max(1, min(width, height) // self.decode_min_side)


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` from the header alone, or None when the bytes are not an
    allowed image whose header Pillow can parse (the decoder then rejects that row with a reason).
    """
    kind = sniff_format(data[:SNIFF_BYTES])
    if kind not in ALLOWED_FORMATS:
        return None
    try:
        with warnings.catch_warnings():
            # the size is what we want to judge here; the decoder escalates the warning later
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as im:
                width, height = im.size
    except DECODE_ERRORS:
        return None
    return kind, int(width), int(height)


def check_request(images: Sequence[bytes | None], limits: DecodeLimits) -> None:
    """Refuse (:class:`RequestTooLarge`, naming the rows) a request over ``limits``, from headers.

    ``None`` entries (rows already rejected) and unparseable headers count zero pixels.
    """
    if len(images) > limits.max_rows:
        raise RequestTooLarge(f"{len(images)} rows > max_rows {limits.max_rows}")
    total = 0
    over: list[str] = []
    for row, data in enumerate(images):
        size = header_size(data) if data else None
        if size is None:
            continue
        pixels = size[1] * size[2]
        total += pixels
        if pixels > limits.max_image_pixels:
            over.append(f"row {row}: {size[1]}x{size[2]} = {pixels} pixels")
    if over:
        shown = "; ".join(over[:5]) + (f"; ... ({len(over)} rows)" if len(over) > 5 else "")
        raise RequestTooLarge(f"{shown} > max_image_pixels {limits.max_image_pixels}")
    if total > limits.max_request_pixels:
        raise RequestTooLarge(
            f"{total} decoded pixels in the request > max_request_pixels {limits.max_request_pixels}"
        )
