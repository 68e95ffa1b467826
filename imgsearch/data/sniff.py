"""What a file is, from its magic bytes: never from its name (see :mod:`imgsearch.data.imageio`).

:func:`sniff_format` names the kind; :data:`ALLOWED_FORMATS` are the ones we decode;
:func:`reject_reason_for` gives the quarantine reason for any other kind.
"""

from __future__ import annotations

#: Formats we decode. Everything else is rejected before Pillow sees it.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"})

#: Formats that are images but that we do not decode (reason ``unsupported_format``).
UNSUPPORTED_IMAGE_FORMATS: frozenset[str] = frozenset(
    {"HEIC", "HEIF", "AVIF", "SVG", "EPS", "ICO", "CUR", "PSD", "JPEG2000", "JXL", "QOI"}
)
#: How many leading bytes :func:`sniff_format` looks at.
SNIFF_BYTES = 1024

_EXT_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "jpe": "JPEG",
    "jfif": "JPEG",
    "png": "PNG",
    "apng": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "dib": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
}

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_MIF_BRANDS = {b"mif1", b"msf1", b"mif2"}


def sniff_format(head: bytes) -> str:
    """The file type from its first bytes (pass at least :data:`SNIFF_BYTES` when you can).

    Returns one of :data:`ALLOWED_FORMATS`, a known rejected kind (``MP4``, ``MOV``, ``HEIC``,
    ``HEIF``, ``AVIF``, ``SVG``, ``XML``, ``HTML``, ``PDF``, ``EPS``, ``ZIP``, ``GZIP``, ``ICO``,
    ``CUR``, ``PSD``, ``JPEG2000``, ``JXL``, ``QOI``, ``AVI``, ``WAV``, ``MKV``, ``EXE``, ``ELF``),
    ``EMPTY`` or ``UNKNOWN``.
    """
    if not head:
        return "EMPTY"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and len(head) >= 12:
        kind = head[8:12]
        return {b"WEBP": "WEBP", b"AVI ": "AVI", b"WAVE": "WAV"}.get(kind, "UNKNOWN")
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _iso_bmff_kind(head)
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "EPS"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "ZIP"
    if head.startswith(b"\x1f\x8b"):
        return "GZIP"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JXL"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "MKV"
    if head.startswith(b"MZ"):
        return "EXE"
    if head.startswith(b"\x7fELF"):
        return "ELF"
    if head[:4] == b"\x00\x00\x01\x00" and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ICO"
    if head[:4] == b"\x00\x00\x02\x00" and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "CUR"
    return _text_kind(head)


def _iso_bmff_kind(head: bytes) -> str:
    """ISO base media files (``....ftyp<brand>``): HEIC/HEIF/AVIF images, MOV, MP4 and kin."""
    major = head[8:12]
    box_len = int.from_bytes(head[:4], "big")
    compatible = {head[i : i + 4] for i in range(16, min(box_len, len(head)) - 3, 4)}
    brands = {major} | compatible
    if major in _AVIF_BRANDS or (major in _MIF_BRANDS and brands & _AVIF_BRANDS):
        return "AVIF"
    if major in _HEIF_BRANDS:
        return "HEIC"
    if major in _MIF_BRANDS:
        return "HEIC" if brands & _HEIF_BRANDS else "HEIF"
    if major == b"qt  ":
        return "MOV"
    return "MP4"


def _text_kind(head: bytes) -> str:
    """SVG / XML / HTML, looked for in text (UTF-8 or UTF-16, with or without a BOM)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head.decode("utf-16", errors="ignore")
    else:
        text = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    text = text.lstrip().lower()
    if text.startswith("<svg"):
        return "SVG"
    if text.startswith(("<?xml", "<!doctype", "<!--")):
        if "<svg" in text:
            return "SVG"
        if "<html" in text or text.startswith("<!doctype html"):
            return "HTML"
        return "XML"
    if text.startswith("<html"):
        return "HTML"
    return "UNKNOWN"


def format_for_extension(name: str | None) -> str | None:
    """The allowed format a file name's extension claims, or None (no or unknown extension)."""
    if not name or "." not in name:
        return None
    return _EXT_FORMATS.get(name.rsplit(".", 1)[1].lower())


def reject_reason_for(kind: str) -> str:
    """The quarantine reason for a sniffed kind that is not in :data:`ALLOWED_FORMATS`."""
    if kind == "EMPTY":
        return "empty_file"
    if kind in UNSUPPORTED_IMAGE_FORMATS:
        return "unsupported_format"
    return "not_an_image"
