"""Per-request bounds of the served index (issue #17, point 3), in process.

Over a limit (rows, pixels per image, decoded pixels per request) the whole request is a 4xx with
the reason and nothing is decoded; a large-but-allowed image is decoded at a bounded size; a
normal-size query decodes exactly as before (the index was built from full decodes). The real
``mlflow models serve`` side (unknown params, nested JSON) is in ``tests/test_serve.py``.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from imgsearch.data import imageio
from imgsearch.data.limits import DecodeLimits, header_size
from registry import models
from tests.test_registry import png_bytes


def _encoded(width: int, height: int, fmt: str = "PNG", mode: str = "L") -> bytes:
    """A flat image of the given size: tiny once compressed, huge once decoded."""
    buf = io.BytesIO()
    Image.new(mode, (width, height), 0).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """40 megapixels in well under 100 KB: what the issue sent eight of in one request."""
    return _encoded(7000, 5714)


def _textured_jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_header_size_reads_only_the_header(bomb_png: bytes) -> None:
    assert header_size(bomb_png) == ("PNG", 7000, 5714)
    assert header_size(b"not an image") is None


def test_eight_40mp_pngs_are_refused_before_decoding(
    bomb_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decode(self: Image.Image) -> None:
        raise AssertionError("an over-limit request must not be decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    start = time.perf_counter()
    with pytest.raises(MlflowException) as info:
        models.decode_images([bomb_png] * 8, limits=DecodeLimits())
    assert time.perf_counter() - start < 2.0
    assert info.value.get_http_status_code() == 400
    assert "pixels" in info.value.message and "row 0" in info.value.message


def test_total_decoded_pixels_per_request_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = DecodeLimits(max_image_pixels=1_000_000, max_request_pixels=2_500_000)
    one_mp = _encoded(1000, 1000)
    images, errors = models.decode_images([one_mp, one_mp], limits=limits)
    assert errors == [None, None] and all(im is not None for im in images)
    with pytest.raises(MlflowException) as info:
        models.decode_images([one_mp] * 3, limits=limits)
    assert info.value.get_http_status_code() == 400
    assert "3000000" in info.value.message and "2500000" in info.value.message


def test_rows_per_request_are_bounded() -> None:
    limits = DecodeLimits(max_rows=4)
    with pytest.raises(MlflowException) as info:
        models.decode_images([png_bytes(1)] * 5, limits=limits)
    assert info.value.get_http_status_code() == 400
    assert "5 rows" in info.value.message and "4" in info.value.message


def test_a_bad_row_is_still_a_row_error_under_limits() -> None:
    images, errors = models.decode_images([b"GIF89a junk", png_bytes(2)], limits=DecodeLimits())
    assert images[0] is None and errors[0] and errors[1] is None


def test_normal_size_queries_decode_exactly_as_before() -> None:
    for data in (png_bytes(3, size=640), _textured_jpeg(1600, 1200)):
        bounded = models.decode_images([data], limits=DecodeLimits())[0][0]
        assert bounded is not None
        full = imageio.open_rgb(data)
        assert bounded.size == full.size
        assert np.array_equal(np.asarray(bounded), np.asarray(full))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_allowed_images_decode_at_a_bounded_size(fmt: str) -> None:
    data = _textured_jpeg(6000, 4000) if fmt == "JPEG" else _encoded(6000, 4000, "PNG", "RGB")
    limits = DecodeLimits(reduce_above_pixels=16_000_000, decode_min_side=896)
    image = models.decode_images([data], limits=limits)[0][0]
    assert image is not None and image.mode == "RGB"
    width, height = image.size
    assert 896 <= min(width, height) < 2 * 896 * 2  # never below the floor, far below 4000
    assert width / height == pytest.approx(1.5, rel=0.01)


def test_limits_refuse_nonsense_values() -> None:
    from imgsearch.errors import ConfigError

    with pytest.raises(ConfigError):
        DecodeLimits(max_rows=0)
    assert DecodeLimits.from_config({"max_rows": "8", "torch_threads": 1}).max_rows == 8


def test_a_refusal_keeps_its_reason_without_mlflows_input_repr() -> None:
    from registry.serving_guard import reason_only

    wrapped = "Failed to predict data '      text lang\n0  Ребёнок   ru'. \nError: query refused: x"
    assert reason_only(wrapped) == "query refused: x"
    assert reason_only("unknown params ['catgory']") == "unknown params ['catgory']"
