"""The backbone embedding kept beside the fine-tuned head (``finetune.keep_backbone``,
``ExtractorSpec.backbone_weight``): the embedding against a naive reference, the spec, every
path that embeds (the extractor, the trunk's re-extraction, the feature pass, int8) agreeing,
and fine-tuning that returns it."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from imgsearch.embed.style import features_of
from imgsearch.embed.trunk import Rest
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import (
    Extractor,
    backbone_blocks,
    embed_pooled,
    fingerprint,
    load_extractor,
    projection_head,
    save_extractor,
)
from imgsearch.models.quantize import QuantizedExtractor
from imgsearch.train.config import HeadConfig
from imgsearch.train.finetune import finetune
from imgsearch.train.parts import split_head
from tests.train_data import SIZE, fast_cfg, register_tiny, shapes_catalog, tiny_extractor


def with_head(w: float, seed: int = 1) -> Extractor:
    base = tiny_extractor()
    torch.manual_seed(seed)
    spec = dataclasses.replace(
        base.spec, head=(16, 8), embedding_dim=8 + (32 if w else 0), backbone_weight=w
    )
    return Extractor(base.body, spec, head=projection_head(32, (16, 8)).eval()).eval()


def pixels(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("w", [0.0, 0.25, 0.8])
def test_the_kept_embeddings_cosine_is_the_weighted_sum_of_the_two(w: float) -> None:
    """Naive reference: cos = w cos(pooled) + (1 - w) cos(head output), each part unit-normed."""
    gen = torch.Generator().manual_seed(0)
    pooled = torch.nn.functional.normalize(torch.randn(5, 12, generator=gen), dim=1)
    head = projection_head(12, (6, 4)).eval()
    with torch.no_grad():
        emb = embed_pooled(pooled, head, w)
    assert emb.shape == (5, 4 + (12 if w else 0))
    np.testing.assert_allclose(emb.norm(dim=1).detach().numpy(), 1.0, atol=1e-6)
    with torch.no_grad():
        outs = [_unit([float(x) for x in r]) for r in head(pooled)]
    rows = [[float(x) for x in r] for r in pooled]
    for i in range(5):
        for j in range(5):
            expected = w * _dot(rows[i], rows[j]) + (1 - w) * _dot(outs[i], outs[j])
            assert float(emb[i] @ emb[j]) == pytest.approx(expected, abs=1e-5)
    assert torch.equal(embed_pooled(pooled, None, 0.0), pooled)  # no head: the pooled features


def test_the_spec_keeps_old_json_and_checks_the_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "backbone_weight" not in with_head(0.0).spec.to_dict()  # old specs, old fingerprints
    kept = with_head(0.6)
    assert kept.spec.to_dict()["backbone_weight"] == 0.6
    assert fingerprint(kept) != fingerprint(with_head(0.0))
    register_tiny(monkeypatch)
    loaded = load_extractor(save_extractor(kept, tmp_path / "ext"))
    assert loaded.spec == kept.spec and fingerprint(loaded) == fingerprint(kept)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()), kept(pixels()))
        assert kept(pixels()).shape == (6, 40)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"backbone_weight must be in \[0, 1\)"):
            dataclasses.replace(kept.spec, backbone_weight=bad)
    with pytest.raises(ConfigError, match="needs a head"):
        dataclasses.replace(kept.spec, head=(), embedding_dim=32)
    wrong = dataclasses.replace(kept.spec, embedding_dim=8)  # the head's width alone
    (tmp_path / "ext" / "spec.json").write_text(wrong.to_json())
    with pytest.raises(ConfigError, match="spec says dim 8"):
        load_extractor(tmp_path / "ext")


def test_every_embedding_path_gives_the_kept_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny(monkeypatch)
    kept = with_head(0.6)
    x = pixels()
    with torch.no_grad():
        full = kept(x)
        early = x
        for block in backbone_blocks(kept)[:1]:  # the trunk: blocks [:1]; Rest runs [1:]
            early = block(early)
        torch.testing.assert_close(Rest(kept, 1)(early), full)
        pooled = kept.body(x)  # the tiny body pools itself: (N, 32)
    feats = features_of(kept, x, ["embedding", "pooled"])
    np.testing.assert_allclose(feats["embedding"], full.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        feats["embedding"][:, :32], math.sqrt(0.6) * feats["pooled"], atol=1e-6
    )
    # int8 serving applies the same step to the quantised body's pooled features
    quantized = QuantizedExtractor(kept.spec, b"", copy.deepcopy(kept.head))
    quantized.features = lambda _: pooled.numpy()  # type: ignore[method-assign]
    torch.testing.assert_close(quantized(x), full)


def test_split_head_drops_the_kept_backbone() -> None:
    body, head = split_head(with_head(0.6))
    assert head is not None and body.spec.head == () and body.spec.backbone_weight == 0.0
    assert body.spec.embedding_dim == 32


def test_keep_backbone_needs_a_kept_head() -> None:
    assert HeadConfig(head_dims=(8,), keep_head=True, keep_backbone=0.5).keep_backbone == 0.5
    with pytest.raises(ConfigError, match="needs keep_head"):
        HeadConfig(head_dims=(8,), keep_head=False, keep_backbone=0.5)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        HeadConfig(head_dims=(8,), keep_head=True, keep_backbone=1.0)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        HeadConfig(head_dims=(8,), keep_head=True, keep_backbone=True)  # type: ignore[arg-type]


def test_fine_tuning_returns_the_backbone_beside_its_head(tmp_path: Path) -> None:
    catalog: pd.DataFrame = shapes_catalog(tmp_path)
    kw: dict[str, object] = {"head_dims": [16], "keep_head": True, "epochs": 2}
    plain = finetune(tiny_extractor(), catalog, fast_cfg(**kw))
    kept = finetune(tiny_extractor(), catalog, fast_cfg(**kw, keep_backbone=0.7))
    assert "keep_backbone" not in fast_cfg(**kw).to_dict()  # checkpoint keys unchanged
    assert kept.extractor.spec.backbone_weight == 0.7
    assert kept.extractor.spec.embedding_dim == 32 + 16
    x = pixels()
    with torch.no_grad():
        a, b = plain.extractor(x), kept.extractor(x)
    # the same training (the option only changes what the result returns)
    torch.testing.assert_close(b[:, 32:], math.sqrt(0.3) * a)
