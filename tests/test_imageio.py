"""imgsearch.data.imageio: RELIABILITY.md promises 1-5 for untrusted image files, one test each (or more)."""

from __future__ import annotations

import io
import re
import resource
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps, UnidentifiedImageError

from imgsearch.data import imageio
from imgsearch.data.imageio import ALLOWED_FORMATS, load_image, open_rgb, sniff_format
from imgsearch.errors import ImageRejected
from tests import badimages as bad


def rejected(data: bytes, **kw: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_image(data, **kw)  # type: ignore[arg-type]
    return info.value


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


# --- 2. format from magic bytes, allowlist, extension never trusted ------------------------------


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (bad.encode(bad.noise(1), "JPEG"), "JPEG"),
        (bad.encode(bad.noise(1), "PNG"), "PNG"),
        (bad.encode(bad.noise(1).convert("P"), "GIF"), "GIF"),
        (bad.encode(bad.noise(1), "WEBP"), "WEBP"),
        (bad.encode(bad.noise(1), "BMP"), "BMP"),
        (bad.encode(bad.noise(1), "TIFF"), "TIFF"),
        (b"MM\x00*\x00\x00\x00\x08", "TIFF"),
        (b"", "EMPTY"),
        (b"\xff", "UNKNOWN"),
        (b"hello world", "UNKNOWN"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"\xef\xbb\xbf  <?xml version='1.0'?><!-- c --><svg/>", "SVG"),
        ("<svg/>".encode("utf-16"), "SVG"),
        (b"<?xml version='1.0'?><root/>", "XML"),
        (b"<!DOCTYPE html><html></html>", "HTML"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "AVIF"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00mif1", "HEIF"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", "MP4"),
        (b"\x1f\x8b\x08\x00", "GZIP"),
        (b"8BPS\x00\x01", "PSD"),
        (b"\x00\x00\x01\x00\x01\x00\x10\x10", "ICO"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "AVI"),
        (b"MZ\x90\x00", "EXE"),
        *[(data, bad.EXPECTED_DETECTED[name]) for name, data in bad.FOREIGN_HEADERS.items()],
    ],
)
def test_sniff_format(head: bytes, kind: str) -> None:
    assert sniff_format(head[: imageio.SNIFF_BYTES]) == kind


@pytest.mark.parametrize("name", sorted(bad.FOREIGN_HEADERS))
def test_foreign_files_named_jpg_are_rejected_with_their_type(name: str) -> None:
    exc = rejected(bad.FOREIGN_HEADERS[name], filename=name)
    assert exc.detected_format == bad.EXPECTED_DETECTED[name]
    assert exc.reason == (
        "not_an_image"
        if exc.detected_format in {"MP4", "MOV", "PDF", "ZIP"}
        else "unsupported_format"
    )
    assert exc.detected_format in exc.detail


def test_eps_is_never_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: object) -> None:
        raise AssertionError("EPS plugin reached: Ghostscript could run")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    for name in ("postscript_eps.jpg", "dos_eps.jpg"):
        assert rejected(bad.FOREIGN_HEADERS[name]).detected_format == "EPS"


def test_pillow_is_asked_for_the_sniffed_format_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real_open = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        seen.append(formats)
        return real_open(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    load_image(bad.encode(bad.noise(2), "PNG"))
    assert seen == [["PNG"]]
    assert ALLOWED_FORMATS == {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"}


def test_pillow_formats_outside_the_allowlist_are_rejected() -> None:
    # Pillow itself would decode these; we do not (no magic we trust, or not on the allowlist).
    for fmt in ("TGA", "PCX", "ICO", "PPM"):
        data = bad.encode(bad.noise(3, size=(32, 32)), fmt)
        exc = rejected(data)
        assert exc.reason in {"not_an_image", "unsupported_format"}, fmt


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("x.png", ["ext_mismatch:jpeg_as_png"]),
        ("x.JPG", []),
        ("x.jpeg", []),
        ("x.dat", []),
        ("noext", []),
        (None, []),
    ],
)
def test_extension_mismatch_is_recorded(filename: str | None, expected: list[str]) -> None:
    data = bad.encode(bad.noise(4), "JPEG")
    loaded = load_image(data, filename=filename)
    assert loaded.format == "JPEG"
    assert loaded.fixes == expected


# --- 1. decompression bombs --------------------------------------------------------------------


def test_bomb_header_40000_squared_is_rejected_without_decoding() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exc = rejected(bad.bomb_png(40000, 40000))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert exc.reason == "decompression_bomb"
    assert exc.detected_format == "PNG"
    assert after - before < 200 * 1024  # KiB: decoding would need ~4.8 GB


def test_bomb_below_pillow_limit_is_rejected_by_max_pixels_before_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_load(self: object) -> None:
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    exc = rejected(bad.bomb_png(8000, 8000), max_pixels=40_000_000)  # 64 MP < Pillow's 89 MP
    assert exc.reason == "decompression_bomb"
    assert "8000x8000" in exc.detail


def test_decompression_bomb_warning_is_escalated() -> None:
    # 100 MP: between Pillow's limit and twice it Pillow only warns; we must raise anyway,
    # even when our own max_pixels is set higher than Pillow's limit.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a leaked warning would not make this test pass
        exc = rejected(bad.bomb_png(10000, 10000), max_pixels=10**9)
    assert exc.reason == "decompression_bomb"
    assert "could be decompression bomb" in exc.detail  # Pillow's own message: the warning path


def test_global_pillow_state_is_never_changed() -> None:
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    for name, data in [("bomb", bad.bomb_png()), ("ok", bad.encode(bad.noise(5), "PNG"))]:
        try:
            load_image(data)
        except ImageRejected:
            assert name == "bomb"
    assert Image.MAX_IMAGE_PIXELS == limit is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters


def test_no_code_in_the_package_relaxes_pillow_limits() -> None:
    pattern = re.compile(r"MAX_IMAGE_PIXELS\s*=|LOAD_TRUNCATED_IMAGES\s*=")
    root = Path(imageio.__file__).resolve().parent
    offenders = [
        str(p) for p in root.rglob("*.py") if pattern.search(p.read_text(errors="replace"))
    ]
    assert offenders == []


# --- 3. valid means fully decoded ----------------------------------------------------------------


def test_truncated_jpeg_passes_verify_but_is_rejected() -> None:
    data = bad.encode(bad.noise(6), "JPEG", quality=90)
    cut = data[: len(data) // 2]
    Image.open(io.BytesIO(cut)).verify()  # the reason verify() is not our test of validity
    assert rejected(cut).reason == "truncated"


def test_truncated_png_is_rejected() -> None:
    data = bad.encode(bad.noise(7), "PNG")
    assert rejected(data[: len(data) // 2]).reason == "truncated"


def test_png_with_bad_crc_fails_verify_but_decodes_and_is_accepted() -> None:
    good = bad.encode(bad.noise(8), "PNG")
    data = bad.with_bad_idat_crc(good)
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(data)).verify()
    loaded = load_image(data)
    assert loaded.fixes == ["png_bad_crc"]
    assert np.array_equal(pixels(loaded.image), pixels(Image.open(io.BytesIO(good))))


def test_png_with_corrupt_pixel_data_is_rejected() -> None:
    data = bad.with_corrupt_idat(bad.encode(bad.noise(9), "PNG"))
    Image.open(io.BytesIO(data)).verify()  # CRC is right: only decoding finds the damage
    assert rejected(data).reason == "corrupt"


def test_png_with_bad_header_crc_is_corrupt() -> None:
    exc = rejected(bad.with_bad_ihdr_crc(bad.encode(bad.noise(10), "PNG")))
    assert (exc.reason, exc.detected_format) == ("corrupt", "PNG")


def test_empty_and_one_byte_files() -> None:
    assert rejected(b"").reason == "empty_file"
    exc = rejected(b"\xff")
    assert (exc.reason, exc.detected_format) == ("not_an_image", "UNKNOWN")


def test_too_small() -> None:
    data = bad.encode(bad.noise(11, size=(40, 8)), "PNG")
    assert rejected(data, min_size=16).reason == "too_small"
    assert load_image(data, min_size=8).image.size == (40, 8)


@pytest.mark.parametrize("suffix", [b"PK\x03\x04payload", b"\x00" * 100])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_bytes_after_eof_are_accepted(fmt: str, suffix: bytes) -> None:
    image = bad.noise(12).convert("P") if fmt == "GIF" else bad.noise(12)
    data = bad.encode(image, fmt)
    plain = load_image(data)
    loaded = load_image(data + suffix)
    assert np.array_equal(pixels(loaded.image), pixels(plain.image))
    assert ("trailing_data" in loaded.fixes) == (fmt == "PNG")  # only PNG's end is exact


# --- 4. every decoder failure becomes one ImageRejected ------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError("broken data stream"), "corrupt"),
        (OSError("image file is truncated"), "truncated"),
        (SyntaxError("bad chunk"), "corrupt"),
        (ValueError("bad value"), "corrupt"),
        (MemoryError(), "corrupt"),
        (NotImplementedError("codec"), "corrupt"),
        (OverflowError("size"), "corrupt"),
        (EOFError(), "truncated"),
        (struct.error("unpack"), "corrupt"),
        (UnidentifiedImageError("?"), "corrupt"),
        (Image.DecompressionBombError("big"), "decompression_bomb"),
    ],
)
def test_decoder_failures_become_image_rejected(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, reason: str
) -> None:
    def fail(self: object) -> None:
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    exc = rejected(bad.encode(bad.noise(13), "PNG"))
    assert exc.reason == reason
    assert exc.detected_format == "PNG"


def test_every_bad_file_is_either_decoded_or_rejected(tmp_path: Path) -> None:
    expected = bad.write_bad_inputs(tmp_path)
    for name, reason in expected.items():
        data = (tmp_path / name).read_bytes()
        try:
            loaded = load_image(data, min_size=32, filename=name)
        except ImageRejected as exc:
            assert exc.reason == reason, name
            continue
        assert reason is None, name
        assert loaded.image.mode == "RGB"
        assert set(bad.EXPECTED_FIXES.get(name, set())) <= set(loaded.fixes), name


# --- 5. deterministic normalisation --------------------------------------------------------------


def _exif_reference(arr: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF 2-8 by their definitions (what to do to the stored image to display it)."""
    return {
        2: lambda a: a[:, ::-1],  # mirror horizontal
        3: lambda a: a[::-1, ::-1],  # rotate 180
        4: lambda a: a[::-1, :],  # mirror vertical
        5: lambda a: a.transpose(1, 0, 2),  # mirror horizontal + rotate 270 CW = transpose
        6: lambda a: np.rot90(a, -1),  # rotate 90 CW
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirror horizontal + rotate 90 CW
        8: lambda a: np.rot90(a, 1),  # rotate 270 CW
    }[orientation](arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(orientation: int) -> None:
    image = bad.noise(20 + orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(bad.encode(image, "PNG", exif=exif))
    expected = pixels(image) if orientation == 1 else _exif_reference(pixels(image), orientation)
    assert loaded.fixes == ([] if orientation == 1 else ["exif_orientation"])
    assert np.array_equal(pixels(loaded.image), expected)
    assert loaded.orig_size == image.size


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_jpeg_matches_imageops(orientation: int) -> None:
    data = bad.exif_jpeg(bad.noise(30 + orientation), orientation)
    loaded = load_image(data)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(pixels(loaded.image), pixels(expected))
    rotated = orientation >= 5
    assert loaded.image.size == ((40, 48) if rotated else (48, 40))


def test_16bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    loaded = load_image(bad.png16(values))
    assert loaded.orig_mode.startswith("I")
    assert loaded.fixes == ["16bit_scaled"]
    got = pixels(loaded.image)
    assert got[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_16bit_rgb_is_scaled() -> None:
    values = np.array([[[65535, 32768, 0]]], dtype=np.uint16)
    loaded = load_image(bad.png16(values))
    assert "16bit_scaled" in loaded.fixes
    assert pixels(loaded.image)[0, 0].tolist() == [255, 128, 0]


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half blue over white
    loaded = load_image(bad.encode(rgba, "PNG"))
    assert loaded.fixes == ["alpha_composite"] and loaded.orig_mode == "RGBA"
    got = pixels(loaded.image)
    assert got[0, 0].tolist() == [255, 255, 255]
    a = 128 / 255
    ref = [round(0 * a + 255 * (1 - a)), round(0 * a + 255 * (1 - a)), 255]
    assert np.abs(got[0, 1] - ref).max() <= 1


def test_opaque_rgba_is_not_a_fix() -> None:
    image = bad.noise(40, "RGBA")
    image.putalpha(255)
    loaded = load_image(bad.encode(image, "PNG"))
    assert loaded.fixes == []
    assert np.array_equal(pixels(loaded.image), np.asarray(image)[..., :3])


def test_la_palette_transparency_and_one_bit() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (100, 255))
    got = load_image(bad.encode(la, "PNG"))
    assert got.fixes == ["alpha_composite"]
    assert pixels(got.image)[0].tolist() == [[255, 255, 255], [100, 100, 100]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 0), 1)
    got = load_image(bad.encode(pal, "PNG", transparency=0))
    assert got.fixes == ["alpha_composite"] and got.orig_mode == "P"
    assert pixels(got.image)[0].tolist() == [[255, 255, 255], [40, 50, 60]]

    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    got = load_image(bad.encode(one, "PNG"))
    assert got.fixes == [] and got.orig_mode == "1"
    assert pixels(got.image)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_cmyk_jpeg_is_converted() -> None:
    data = bad.encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    loaded = load_image(data)
    assert loaded.fixes == ["cmyk_to_rgb"] and loaded.orig_mode == "CMYK"
    assert np.abs(pixels(loaded.image)[16, 16] - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_frame_zero(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = bad.encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **extra)
    loaded = load_image(data)
    assert loaded.fixes == ["first_frame"]
    assert pixels(loaded.image)[5, 5].tolist() == [255, 0, 0]


def test_normalisation_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    expected = bad.write_bad_inputs(tmp_path)
    for name, reason in expected.items():
        if reason is not None:
            continue
        data = (tmp_path / name).read_bytes()
        first, second = load_image(data), load_image(data)
        assert np.array_equal(pixels(first.image), pixels(second.image)), name
        # the fixed copy (PNG of the normalised image) decodes to the same pixels, with no fixes
        again = load_image(bad.encode(first.image, "PNG"))
        assert again.fixes == [] and np.array_equal(pixels(again.image), pixels(first.image)), name


def test_unsupported_mode_is_rejected() -> None:
    data = bad.encode(Image.new("F", (32, 32), 0.5), "TIFF")
    assert rejected(data).reason == "unsupported_mode"


# --- open_rgb: the query path --------------------------------------------------------------------


def test_open_rgb_accepts_path_bytes_and_file(tmp_path: Path) -> None:
    data = bad.exif_jpeg(bad.noise(50), 6)
    path = tmp_path / "q.jpg"
    path.write_bytes(data)
    ref = pixels(load_image(data).image)
    for source in (path, str(path), data, io.BytesIO(data)):
        image = open_rgb(source)
        assert image.mode == "RGB"
        assert np.array_equal(pixels(image), ref)


def test_open_rgb_applies_the_same_checks(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        open_rgb(bad.bomb_png())
    path = tmp_path / "big.png"
    path.write_bytes(bad.encode(bad.noise(51), "PNG"))
    with pytest.raises(ImageRejected) as info:
        open_rgb(path, max_bytes=100)
    assert info.value.reason == "file_too_large"
    with pytest.raises(OSError):
        open_rgb(tmp_path / "missing.png")
