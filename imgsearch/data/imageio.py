"""Safe decoding of untrusted image files, and the one deterministic normalisation to RGB.

Every image that enters imgsearch (catalog files in ``validate``, query images at search time)
goes through :func:`load_image`. What it promises (docs: RELIABILITY.md, "Untrusted image files"):

1. Decompression bombs are rejected before decoding: the size declared in the header is checked
   against ``max_pixels`` right after ``Image.open`` (which only parses the header), and Pillow's
   ``DecompressionBombWarning`` is escalated to an error. ``Image.MAX_IMAGE_PIXELS`` is never
   changed, so the effective limit is ``min(max_pixels, Image.MAX_IMAGE_PIXELS)``.
2. The format comes from magic bytes (:func:`sniff_format`), never from the file name, and must be
   in :data:`ALLOWED_FORMATS`; Pillow is told to try that one format only (``formats=[...]``), so
   EPS (Ghostscript), PSD, AVIF and the rest of Pillow's plugins are never reached.
3. "Valid" means fully decoded: ``load()`` then ``convert()`` on a fresh handle. ``verify()`` is
   not used: it passes a truncated JPEG, and it fails a PNG whose chunk CRC is wrong although its
   pixel data decode intact (we accept that one, record ``png_bad_crc`` and re-encode it).
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched (it stays False).
4. Any decoder failure becomes :class:`~imgsearch.errors.ImageRejected` with a stable reason.
5. Normalisation is deterministic (same bytes -> same RGB pixels) and each change is recorded in
   ``LoadedImage.fixes``: ``first_frame``, ``exif_orientation``, ``16bit_scaled``,
   ``cmyk_to_rgb``, ``alpha_composite`` (on white), ``png_bad_crc``, ``trailing_data`` (PNG bytes
   after IEND; the fixed copy drops them) and ``ext_mismatch:<format>_as_<ext>``.
   Lossless mode changes (L, 1, P without transparency, opaque RGBA -> RGB) are not "fixes".

Bytes after the end of the image are accepted (decoders stop at the end marker; the payload is
never interpreted). They are detected and recorded only for PNG, whose chunk structure makes that
exact; for JPEG/GIF/WebP they are left in the original file, which is kept as is.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgsearch.data.sniff import (
    ALLOWED_FORMATS,
    SNIFF_BYTES,
    UNSUPPORTED_IMAGE_FORMATS,
    format_for_extension,
    reject_reason_for,
    sniff_format,
)
from imgsearch.errors import ImageRejected
from imgsearch.paths import str_to_path

log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "BACKGROUND",
    "DECODE_ERRORS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SNIFF_BYTES",
    "UNSUPPORTED_IMAGE_FORMATS",
    "LoadedImage",
    "fix_codes",
    "format_for_extension",
    "load_image",
    "open_rgb",
    "read_bytes",
    "reject_reason_for",
    "sniff_format",
]

#: 40 megapixels: a large camera frame (about 120 MB once decoded to RGB).
DEFAULT_MAX_PIXELS = 40_000_000
#: Files larger than this are not read into memory at all (reason ``file_too_large``).
DEFAULT_MAX_BYTES = 100_000_000
#: Transparent pixels are composited onto this colour (fixed, so normalisation is deterministic).
BACKGROUND = (255, 255, 255)

#: Exceptions a Pillow decoder raises on a malformed file. They all mean "this file is bad".
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    MemoryError,
    NotImplementedError,
    OverflowError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass
class LoadedImage:
    """A decoded, normalised image. ``image`` is RGB; ``orig_size`` is (width, height) as stored."""

    image: Image.Image
    format: str
    orig_size: tuple[int, int]
    orig_mode: str
    fixes: list[str] = field(default_factory=list)


def read_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a file, refusing (``file_too_large``) to read more than ``max_bytes``.

    ``path`` may be a manifest string (a ``file:`` URI for non-UTF-8 names, see
    :func:`imgsearch.paths.str_to_path`). Anything but a regular file (a FIFO, a device) is refused
    (``not_a_file``) without blocking on it. ``OSError`` (missing, unreadable, a directory)
    propagates: the caller decides its reason.
    """
    if isinstance(path, str):
        path = str_to_path(path)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"is a directory: {path}")
        if not stat.S_ISREG(mode):
            raise ImageRejected("not_a_file", "not a regular file (FIFO, device or socket)")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected("file_too_large", f"more than {max_bytes} bytes")
    return data


def load_image(
    data: bytes,
    *,
    min_size: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    filename: str | None = None,
    reduce_by: Callable[[int, int], int] | None = None,
) -> LoadedImage:
    """Decode untrusted ``data`` fully and normalise it to RGB.

    ``reduce_by(width, height)`` (optional) gives an integer factor to decode at a reduced scale
    (:func:`_reduced`): a query only needs a few hundred pixels, so a large image need not be held
    at full size (see :class:`imgsearch.data.limits.DecodeLimits`). 1 decodes as is.

    ``filename`` (optional, only its extension is used) lets a format/extension mismatch be
    recorded as a fix. Raises :class:`ImageRejected` with ``reason`` one of ``empty_file``,
    ``not_an_image``, ``unsupported_format`` (with ``detected_format`` set), ``decompression_bomb``,
    ``too_small``, ``truncated``, ``corrupt``, ``unsupported_mode``.
    """
    kind = sniff_format(data[:SNIFF_BYTES])
    if kind not in ALLOWED_FORMATS:
        named = f" named {filename!r}" if filename else ""
        detail = "zero bytes" if kind == "EMPTY" else f"content is {kind}{named}"
        raise ImageRejected(reject_reason_for(kind), detail, kind)
    fixes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow warns (does not raise) between MAX_IMAGE_PIXELS and twice that: make it raise.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as im:
                width, height = im.size
                _check_size(width, height, min_size=min_size, max_pixels=max_pixels, kind=kind)
                orig_mode = im.mode
                if getattr(im, "is_animated", False):
                    im.seek(0)
                    fixes.append("first_frame")
                factor = reduce_by(width, height) if reduce_by else 1
                rgb = _reduced(im, kind, factor, fixes)
    except ImageRejected as exc:
        exc.detected_format = exc.detected_format or kind
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc), kind) from exc
    except UnidentifiedImageError as exc:
        detail = f"{kind} signature, but Pillow cannot parse the header (bad checksum or fields)"
        raise ImageRejected("corrupt", detail, kind) from exc
    except DECODE_ERRORS as exc:
        raise ImageRejected(_decode_reason(exc), f"{type(exc).__name__}: {exc}", kind) from exc
    if kind == "PNG":
        fixes.extend(f for f in _png_structure_fixes(data) if f not in fixes)
    claimed = format_for_extension(filename)
    if claimed is not None and claimed != kind:
        ext = (filename or "").rsplit(".", 1)[1].lower()
        fixes.append(f"ext_mismatch:{kind.lower()}_as_{ext}")
    return LoadedImage(rgb, kind, (width, height), orig_mode, fixes)


def open_rgb(
    source: str | Path | bytes | BinaryIO,
    *,
    min_size: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reduce_by: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """A path, bytes or a binary file object -> normalised RGB image (same checks as validate).

    The query path uses this so a query image is decoded exactly like an indexed one.
    Raises :class:`ImageRejected` (and ``OSError`` when a path cannot be read).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = None
    elif isinstance(source, (str, Path)):
        data = read_bytes(source, max_bytes)
        name = str(source)
    else:
        data = source.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageRejected("file_too_large", f"more than {max_bytes} bytes")
        name = None
    loaded = load_image(
        data, min_size=min_size, max_pixels=max_pixels, filename=name, reduce_by=reduce_by
    )
    return loaded.image


def _reduced(im: Image.Image, kind: str, factor: int, fixes: list[str]) -> Image.Image:
    """Decode and normalise ``im`` at 1/``factor`` of its size (``factor`` 1: as is).

    JPEG: ``draft`` makes libjpeg decode at 1/2, 1/4 or 1/8 scale (the largest that keeps at
    least 1/``factor``), so the full-size pixels never exist. Other formats have no reduced
    decode: ``Image.reduce`` (box average) right after, so only the small copy is kept.
    """
    width, height = im.size
    target = (-(-width // factor), -(-height // factor))
    if factor > 1 and kind == "JPEG":
        im.draft(im.mode, target)
    im.load()
    rgb = _normalise(im, fixes)
    if factor > 1:
        # draft scales by a power of two, never below the target: reduce by what is left
        rest = min(rgb.size) // min(target)
        rgb = rgb.reduce(rest) if rest > 1 else rgb
        fixes.append("reduced")
    return rgb


def _check_size(width: int, height: int, *, min_size: int, max_pixels: int, kind: str) -> None:
    """Header-declared size checks: run before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"declared size {width}x{height}", kind)
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise ImageRejected(
            "decompression_bomb",
            f"declared size {width}x{height} = {width * height} pixels > limit {limit}",
            kind,
        )
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height} < min_size {min_size}", kind)


def _decode_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text:
        return "truncated"
    return "corrupt"


def _normalise(im: Image.Image, fixes: list[str]) -> Image.Image:
    """Loaded frame -> RGB, deterministically; appends what it changed to ``fixes``."""
    orientation = _exif_orientation(im)
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        fixes.append("exif_orientation")
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit int) grey: scale the 0..65535 range to 0..255 with rounding. A plain
        # convert("L") would clip everything above 255 to white.
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        im = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
        fixes.append("16bit_scaled")
    elif mode == "F":
        raise ImageRejected("unsupported_mode", "32-bit float pixels")
    elif mode == "CMYK":
        im = im.convert("RGB")
        fixes.append("cmyk_to_rgb")
    elif mode == "1":
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.has_transparency_data:
        rgba = im.convert("RGBA")
        alpha_min = rgba.getchannel("A").getextrema()[0]
        if isinstance(alpha_min, (int, float)) and alpha_min < 255:
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            rgba = Image.alpha_composite(background, rgba)
            fixes.append("alpha_composite")
        return rgba.convert("RGB")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as exc:  # e.g. LAB, HSV: no direct conversion in Pillow
            raise ImageRejected("unsupported_mode", f"mode {im.mode}: {exc}") from exc
    return im


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value)
    except DECODE_ERRORS:  # a malformed EXIF block does not make the pixels bad
        return 1


def _png_structure_fixes(data: bytes) -> list[str]:
    """Walk PNG chunks: a wrong CRC (pixels decoded fine) or bytes after IEND are recorded."""
    fixes: list[str] = []
    if len(data) > 24 and data[24] == 16:  # IHDR bit depth 16: Pillow kept the high bytes
        fixes.append("16bit_scaled")
    pos = 8
    bad_crc = False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            break  # truncated tail: the decoder accepted the pixels, nothing to record
        ctype = data[pos + 4 : pos + 8]
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            bad_crc = True
        pos = end
        if ctype == b"IEND":
            break
    if bad_crc:
        fixes.append("png_bad_crc")
    if pos < len(data) and data[pos - 8 : pos - 4] == b"IEND":
        fixes.append("trailing_data")
    return fixes


def fix_codes(fixes: Sequence[str]) -> list[str]:
    """Metric-friendly codes: the part before ``:`` (``ext_mismatch:jpeg_as_png`` -> ``ext_mismatch``)."""
    return [f.split(":", 1)[0] for f in fixes]


def as_rgb(img: Image.Image) -> Image.Image:
    """RGB as :func:`open_rgb` would make it: other modes go through a lossless re-encode
    (PNG, or TIFF for modes PNG cannot hold) and the same normalisation (alpha on the fixed
    background, 16-bit scaling, palette/CMYK conversion)."""
    if img.mode == "RGB":
        return img
    buffer = io.BytesIO()
    try:
        img.save(buffer, format="PNG")
    except (OSError, KeyError, ValueError):
        buffer = io.BytesIO()
        img.save(buffer, format="TIFF")
    return open_rgb(buffer.getvalue())
