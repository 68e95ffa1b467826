"""A folder of hostile and awkward image files (RELIABILITY.md, "Bad inputs to try": the file cases).

``write_bad_inputs(folder)`` writes them and returns ``{file name: expected quarantine reason}``,
``None`` meaning "must come out clean" (possibly fixed). Every clean file is drawn from its own
random seed, so no two are near duplicates even when all are put in one item.
Expectations hold for the default :class:`imgsearch.data.validate.ValidateConfig`.

Reused by the acceptance test; keep it free of pytest imports.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = (48, 40)  # width, height: not square, so a wrong rotation changes the shape

#: Fix codes each clean file must at least carry (file name -> codes).
EXPECTED_FIXES: dict[str, set[str]] = {
    "bad_crc.png": {"png_bad_crc"},
    "animated.gif": {"first_frame"},
    "animated.webp": {"first_frame"},
    "cmyk.jpg": {"cmyk_to_rgb"},
    "gray16.png": {"16bit_scaled"},
    "rgb16.png": {"16bit_scaled"},
    "rgba.png": {"alpha_composite"},
    "palette_transparency.png": {"alpha_composite"},
    "la.png": {"alpha_composite"},
    "trailing.png": {"trailing_data"},
    "jpeg_named.png": {"ext_mismatch:jpeg_as_png"},
    **{f"exif_{o}.jpg": {"exif_orientation"} for o in range(2, 9)},
}

#: detected_format each type-rejected file must report.
EXPECTED_DETECTED: dict[str, str] = {
    "empty.jpg": "EMPTY",
    "one_byte.jpg": "UNKNOWN",
    "video.jpg": "MP4",
    "movie.jpg": "MOV",
    "photo_heic.jpg": "HEIC",
    "photo_avif.jpg": "AVIF",
    "drawing_svg.jpg": "SVG",
    "document_pdf.jpg": "PDF",
    "postscript_eps.jpg": "EPS",
    "dos_eps.jpg": "EPS",
    "archive_zip.jpg": "ZIP",
}


def noise(seed: int, mode: str = "RGB", size: tuple[int, int] = SIZE) -> Image.Image:
    """A random image: any two seeds are far apart in perceptual hash."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode == "1":
        return Image.fromarray(
            rng.integers(0, 2, (size[1], size[0]), dtype=np.uint8) * 255
        ).convert("1")
    shape = (size[1], size[0]) if bands == 1 else (size[1], size[0], bands)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    if mode == "P":  # 16 random colours, so every index (0 included) is common
        image = Image.frombytes("P", size, (arr % 16).tobytes())
        image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return image
    return Image.frombytes(mode, size, arr.tobytes())


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(ctype: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + data) if crc is None else crc
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", crc)


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, offset of the length field, data length)`` of each chunk."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        out.append((data[pos + 4 : pos + 8], pos, length))
        pos += 12 + length
    return out


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A ~100-byte PNG whose header claims ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand: ``values`` uint16 (h, w) grey or (h, w, 3) RGB."""
    h, w = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def with_bad_idat_crc(png: bytes) -> bytes:
    """Flip the CRC of the first IDAT chunk; the pixel data stay intact."""
    out = bytearray(png)
    for ctype, pos, length in png_chunks(png):
        if ctype == b"IDAT":
            out[pos + 8 + length] ^= 0xFF
            return bytes(out)
    raise ValueError("no IDAT chunk")


def with_corrupt_idat(png: bytes) -> bytes:
    """Flip a byte inside the compressed pixel data and fix the CRC: only decoding can tell."""
    out = bytearray(png)
    for ctype, pos, length in png_chunks(png):
        if ctype == b"IDAT":
            out[pos + 8 + length // 2] ^= 0x55
            crc = zlib.crc32(bytes(out[pos + 4 : pos + 8 + length]))
            out[pos + 8 + length : pos + 12 + length] = struct.pack(">I", crc)
            return bytes(out)
    raise ValueError("no IDAT chunk")


def with_bad_ihdr_crc(png: bytes) -> bytes:
    out = bytearray(png)
    out[8 + 8 + 13] ^= 0xFF  # IHDR's CRC follows its 13 data bytes
    return bytes(out)


def exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def animated(fmt: str, seed: int) -> bytes:
    frames = [noise(seed + k) for k in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


# Minimal headers of files that are not (supported) images, as they would be renamed .jpg.
FOREIGN_HEADERS: dict[str, bytes] = {
    "video.jpg": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x08free",
    "movie.jpg": b"\x00\x00\x00\x14ftypqt  \x20\x05\x03\x00qt  " + b"\x00\x00\x00\x08wide",
    "photo_heic.jpg": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 16,
    "photo_avif.jpg": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 16,
    "drawing_svg.jpg": (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="48" height="40">'
        b'<rect width="48" height="40" fill="red"/></svg>\n'
    ),
    "document_pdf.jpg": b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n",
    "postscript_eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 40\nshowpage\n%%EOF\n",
    "dos_eps.jpg": b"\xc5\xd0\xd3\xc6"
    + struct.pack("<IIIIII", 30, 40, 0, 0, 0, 0)
    + b"\xff\xff"
    + b"%!PS-Adobe-3.0 EPSF-3.0\nshowpage\n",
    "archive_zip.jpg": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 20 + b"payload",
}


def write_bad_inputs(folder: Path) -> dict[str, str | None]:
    """Write every file case into ``folder``; return ``{name: expected reason or None}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytes, str | None]] = {}
    seed = iter(range(1000, 2000, 7))

    good_png = encode(noise(next(seed)), "PNG")
    good_jpeg = encode(noise(next(seed)), "JPEG", quality=90)
    files["ok.jpg"] = (good_jpeg, None)
    files["ok.png"] = (good_png, None)
    files["ok.bmp"] = (encode(noise(next(seed)), "BMP"), None)
    files["ok.tiff"] = (encode(noise(next(seed)), "TIFF"), None)
    files["ok.webp"] = (encode(noise(next(seed)), "WEBP", lossless=True), None)
    files["gray.png"] = (encode(noise(next(seed), "L"), "PNG"), None)

    # empty, tiny, truncated, corrupt
    files["empty.jpg"] = (b"", "empty_file")
    files["one_byte.jpg"] = (b"\xff", "not_an_image")
    jpeg = encode(noise(next(seed)), "JPEG", quality=90)
    files["truncated.jpg"] = (jpeg[: len(jpeg) // 2], "truncated")
    png = encode(noise(next(seed)), "PNG")
    files["truncated.png"] = (png[: len(png) // 2], "truncated")
    files["bad_crc.png"] = (with_bad_idat_crc(encode(noise(next(seed)), "PNG")), None)
    files["corrupt_idat.png"] = (with_corrupt_idat(encode(noise(next(seed)), "PNG")), "corrupt")
    files["bad_ihdr_crc.png"] = (with_bad_ihdr_crc(encode(noise(next(seed)), "PNG")), "corrupt")
    files["bomb.png"] = (bomb_png(), "decompression_bomb")
    files["tiny.png"] = (encode(noise(next(seed), size=(8, 8)), "PNG"), "too_small")

    # not images, or images of formats we do not decode, all renamed .jpg
    for name, data in FOREIGN_HEADERS.items():
        kind = EXPECTED_DETECTED[name]
        reason = "not_an_image" if kind in {"MP4", "MOV", "PDF", "ZIP"} else "unsupported_format"
        files[name] = (data, reason)

    # awkward but usable: must come out clean, normalised
    files["animated.gif"] = (animated("GIF", next(seed)), None)
    files["animated.webp"] = (animated("WEBP", next(seed)), None)
    files["cmyk.jpg"] = (encode(noise(next(seed), "CMYK"), "JPEG", quality=90), None)
    gray16 = np.random.default_rng(next(seed)).integers(
        0, 65536, (SIZE[1], SIZE[0]), dtype=np.uint16
    )
    files["gray16.png"] = (png16(gray16), None)
    rgb16 = np.random.default_rng(next(seed)).integers(
        0, 65536, (SIZE[1], SIZE[0], 3), dtype=np.uint16
    )
    files["rgb16.png"] = (png16(rgb16), None)
    files["rgba.png"] = (encode(noise(next(seed), "RGBA"), "PNG"), None)
    files["la.png"] = (encode(noise(next(seed), "LA"), "PNG"), None)
    pal = noise(next(seed), "P")
    files["palette_transparency.png"] = (encode(pal, "PNG", transparency=0), None)
    files["one_bit.png"] = (encode(noise(next(seed), "1"), "PNG"), None)
    for orientation in range(2, 9):
        files[f"exif_{orientation}.jpg"] = (exif_jpeg(noise(next(seed)), orientation), None)
    # bytes after the end of the image: accepted (decoders stop at the end marker)
    files["trailing.png"] = (
        encode(noise(next(seed)), "PNG") + b"PK\x03\x04 appended payload",
        None,
    )
    files["trailing.jpg"] = (
        encode(noise(next(seed)), "JPEG") + b"PK\x03\x04 appended payload",
        None,
    )
    files["jpeg_named.png"] = (encode(noise(next(seed)), "JPEG", quality=90), None)

    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
