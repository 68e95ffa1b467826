"""The frozen trunk's outputs written by the baseline extraction and reused by fine-tuning and the
re-extraction (:mod:`imgsearch.embed.trunk`): reuse only on a matching fingerprint, the frozen
blocks really not run, embeddings equal to the full pass within float16 tolerance, failures kept.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.embed.extras import ExtrasSpec, ExtrasWriter, extras_mismatch, load_extras, read_meta
from imgsearch.embed.trunk import (
    CHECK_ROWS,
    TrunkStore,
    extract_writing_trunk,
    trunk_fingerprint,
)
from imgsearch.embed.trunk_read import extract_from_trunk, gram_source
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, backbone_blocks, fingerprint, projection_head
from imgsearch.train.finetune import finetune
from tests.train_data import fast_cfg, register_tiny, shapes_catalog, tiny_extractor

CFG = ExtractConfig(batch_size=8, num_workers=0, threads=1, channels_last=False)
K = 2  # tiny has 3 blocks: blocks [:2] frozen, block 2 trains


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny(monkeypatch)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The shapes catalogue plus one unreadable file (a train row) and a sha256 per row."""
    root = tmp_path_factory.mktemp("trunk_shapes")
    df = shapes_catalog(root)
    (root / "broken.png").write_bytes(b"not an image")
    broken = {
        schema.IMAGE_ID: "broken",
        schema.ITEM_ID: "circle-0",
        schema.URI: "broken.png",
        schema.PATH: str(root / "broken.png"),
        "vendor": "a",
        schema.SPLIT: "train",
    }
    df = pd.concat([df.iloc[:5], pd.DataFrame([broken]), df.iloc[5:]], ignore_index=True)
    df[schema.SHA256] = [f"sha-{i}" for i in df[schema.IMAGE_ID]]
    return df


@pytest.fixture
def written(catalog: pd.DataFrame, tmp_path: Path) -> tuple[object, TrunkStore]:
    result, path = extract_writing_trunk(
        tiny_extractor(), catalog, CFG, tmp_path / "trunk", K, "float16", progress=False
    )
    return result, TrunkStore(path)


def finetuned_like(base: Extractor, seed: int = 1) -> Extractor:
    """``base`` with its trainable block changed and a head: what fine-tuning returns."""
    out = copy.deepcopy(base)
    torch.manual_seed(seed)
    for p in backbone_blocks(out)[K].parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    spec = dataclasses.replace(out.spec, weights="none+supcon", head=(16, 8), embedding_dim=8)
    return Extractor(out.body, spec, head=projection_head(32, (16, 8)).eval()).eval()


class Counter:
    """Counts the images each of the first ``K`` blocks sees (forward hooks)."""

    def __init__(self, model: Extractor) -> None:
        self.images = 0
        self.handle = backbone_blocks(model)[0].register_forward_hook(self._count)

    def _count(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self.images += len(output)

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def count() -> Iterator[list[Counter]]:
    made: list[Counter] = []
    yield made
    for c in made:
        c.close()


def test_writing_the_trunk_leaves_the_embeddings_and_failures_of_the_plain_pass(
    catalog: pd.DataFrame, written: tuple[object, TrunkStore]
) -> None:
    result, store = written
    plain = extract(tiny_extractor(), catalog, CFG, progress=False)
    assert list(result.ids) == list(plain.ids)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.embeddings, plain.embeddings)  # type: ignore[attr-defined]
    assert list(result.failures[schema.IMAGE_ID]) == ["broken"]  # type: ignore[attr-defined]
    assert store.n == len(catalog) - 1 and store.blocks == K and store.dtype == "float16"
    # each row is blocks [:K] of the image, in float16
    ext = tiny_extractor()
    rows = catalog.iloc[:4]
    trunk = nn.Sequential(*backbone_blocks(ext)[:K])
    from imgsearch.train.inputs import load_images, normaliser

    images, _, _ = load_images(rows, ext.spec.preprocess)
    with torch.no_grad():
        expect = trunk(normaliser(ext.spec.preprocess)(images)).half()
    got = store.rows(store.positions(rows))
    assert torch.equal(got, expect)
    assert store.fingerprint == trunk_fingerprint(ext, K, "float16")


def test_fingerprint_changes_with_weights_size_blocks_and_dtype_only() -> None:
    ext = tiny_extractor()
    fp = trunk_fingerprint(ext, K, "float16")
    assert trunk_fingerprint(finetuned_like(ext), K, "float16") == fp  # later blocks, head: same
    other = tiny_extractor(seed=5)
    assert trunk_fingerprint(other, K, "float16") != fp
    bigger = Extractor(
        ext.body,
        dataclasses.replace(ext.spec, preprocess=PreprocessConfig(size=48)),
    )
    assert trunk_fingerprint(bigger, K, "float16") != fp
    assert trunk_fingerprint(ext, 1, "float16") != fp
    assert trunk_fingerprint(ext, K, "float32") != fp
    bn = copy.deepcopy(ext)
    bn.body.features[0][1].running_mean.add_(1.0)  # a BatchNorm statistic of a frozen block
    assert trunk_fingerprint(bn, K, "float16") != fp
    with pytest.raises(ConfigError):
        trunk_fingerprint(ext, K, "int8")


def test_re_extraction_runs_only_the_later_blocks_and_matches_the_full_pass(
    catalog: pd.DataFrame,
    written: tuple[object, TrunkStore],
    count: list[Counter],
    tmp_path: Path,
) -> None:
    _, store = written
    tuned = finetuned_like(tiny_extractor())
    full = extract(tuned, catalog, CFG, progress=False)
    counter = Counter(tuned)
    count.append(counter)
    res = extract_from_trunk(tuned, catalog, CFG, store, out=tmp_path / "e.npy", progress=False)
    # blocks [:K] saw the CHECK_ROWS check images only (the row not in the artifact, unreadable,
    # was tried again and failed before reaching them)
    assert counter.images == CHECK_ROWS
    assert list(res.ids) == list(full.ids)
    cos = (res.embeddings * full.embeddings).sum(axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(res.embeddings, full.embeddings, atol=5e-3)
    assert list(res.failures[schema.IMAGE_ID]) == ["broken"]  # still a failure row
    assert res.metrics["n_from_trunk"] == store.n and res.metrics["n_not_in_trunk"] == 1
    assert res.metrics["trunk_check_min_cosine"] > 0.999


def test_a_row_whose_file_changed_or_is_new_takes_the_full_pass(
    catalog: pd.DataFrame, written: tuple[object, TrunkStore], count: list[Counter]
) -> None:
    _, store = written
    changed = catalog.copy()
    changed.loc[0, schema.SHA256] = "another"
    assert store.positions(changed)[0] == -1 and store.positions(catalog)[0] == 0
    tuned = finetuned_like(tiny_extractor())
    counter = Counter(tuned)
    count.append(counter)
    res = extract_from_trunk(tuned, changed, CFG, store, progress=False)
    assert counter.images == CHECK_ROWS + 1 and res.metrics["n_not_in_trunk"] == 2


def test_another_frozen_part_never_reuses_the_artifact(
    catalog: pd.DataFrame, written: tuple[object, TrunkStore]
) -> None:
    _, store = written
    assert store.matches(finetuned_like(tiny_extractor()))
    assert not store.matches(tiny_extractor(seed=5))
    with pytest.raises(ConfigError, match="fingerprint"):
        extract_from_trunk(tiny_extractor(seed=5), catalog, CFG, store, progress=False)


def test_a_drifting_check_falls_back_to_the_full_pass(
    catalog: pd.DataFrame, written: tuple[object, TrunkStore], count: list[Counter]
) -> None:
    _, store = written
    tuned = finetuned_like(tiny_extractor())
    counter = Counter(tuned)
    count.append(counter)
    res = extract_from_trunk(tuned, catalog, CFG, store, progress=False, min_cosine=1.1)
    assert counter.images == CHECK_ROWS + len(catalog) - 1  # the check, then every readable row
    full = extract(tuned, catalog, CFG, progress=False)
    np.testing.assert_array_equal(res.embeddings, full.embeddings)
    assert res.metrics["n_from_trunk"] == 0


def test_finetune_reads_the_frozen_outputs_instead_of_computing_them(
    catalog: pd.DataFrame, written: tuple[object, TrunkStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, store = written
    kw: dict[str, object] = {
        "augment": False,
        "freeze_blocks": K,
        "epochs": 2,
        "head_dims": [16],
        "cache_dtype": "float16",
    }
    seen: list[int] = []
    real_forward = nn.Sequential.forward

    def counting(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if len(self) == K:  # the trunk split_at builds
            seen.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(nn.Sequential, "forward", counting)
    monkeypatch.setattr("imgsearch.train.inputs.STORE_CHUNK", 7)  # copied in several chunks
    reused = finetune(tiny_extractor(), catalog, fast_cfg(**kw), trunk=store)
    # only split_at's 2-image probe ran the trunk (the unreadable row never reaches it)
    assert seen == [2]
    seen.clear()
    computed = finetune(tiny_extractor(), catalog, fast_cfg(**kw))
    assert sum(seen) == 2 + len(catalog) - 1
    assert reused.metrics["n_from_trunk"] == len(catalog) - 1
    assert computed.metrics["n_from_trunk"] == 0
    assert list(reused.failures[schema.IMAGE_ID]) == ["broken"]
    cols = ["loss", "val_map_at_r", "val_map_at_r_head"]
    pd.testing.assert_frame_equal(reused.history[cols], computed.history[cols], atol=1e-3)
    # another frozen part (other weights): the artifact is not used
    seen.clear()
    other = finetune(tiny_extractor(seed=5), catalog, fast_cfg(**kw), trunk=store)
    assert other.metrics["n_from_trunk"] == 0 and sum(seen) == 2 + len(catalog) - 1
    # another dtype: not used either
    seen.clear()
    f32 = finetune(
        tiny_extractor(), catalog, fast_cfg(**{**kw, "cache_dtype": "float32"}), trunk=store
    )
    assert f32.metrics["n_from_trunk"] == 0


def test_extract_step_writes_trunk_and_a_later_run_starts_from_its_uri(
    catalog: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steps.extract --write-trunk logs trunk/; --trunk-uri runs:/<id>/trunk is then used by an
    extractor with the same frozen part, and ignored (tagged) by one without."""
    import mlflow

    from imgsearch.embed.files import load_embeddings
    from imgsearch.models.backbones import save_extractor
    from steps import extract as step
    from steps.common import artifact_path, log_df
    from steps.extract import TAG_EXTRAS

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    base_dir = save_extractor(tiny_extractor(), tmp_path / "base")
    tuned_dir = save_extractor(finetuned_like(tiny_extractor()), tmp_path / "tuned")
    other_dir = save_extractor(tiny_extractor(seed=5), tmp_path / "other")
    overrides = {
        "extract.num_workers": 0,
        "extract.batch_size": 8,
        "finetune.freeze_blocks": K,
        "finetune.augment": False,
    }
    try:
        with mlflow.start_run() as pre_run:
            log_df(catalog, "manifest.parquet")
        pre = pre_run.info.run_id
        base = step.run(pre, extractor_uri=str(base_dir), overrides=overrides, write_trunk=True)
        tags = mlflow.get_run(base).data.tags
        assert tags["imgsearch.trunk.written"] == "true"
        store = TrunkStore(artifact_path(base, "trunk"))
        assert store.n == len(catalog) - 1
        uri = f"runs:/{base}/trunk"
        tuned = step.run(pre, extractor_uri=str(tuned_dir), overrides=overrides, trunk_uri=uri)
        run = mlflow.get_run(tuned)
        assert run.data.tags["imgsearch.trunk.reused"] == "true"
        assert run.data.metrics["n_from_trunk"] == store.n and run.data.metrics["n_failed"] == 1
        ids, emb = load_embeddings(artifact_path(tuned, "embeddings.parquet"))
        full = extract(finetuned_like(tiny_extractor()), catalog, CFG, progress=False)
        assert list(ids) == list(full.ids)
        np.testing.assert_allclose(emb, full.embeddings, atol=5e-3)
        other = step.run(pre, extractor_uri=str(other_dir), overrides=overrides, trunk_uri=uri)
        run = mlflow.get_run(other)
        assert "fingerprint" in run.data.tags["imgsearch.trunk.skipped"]
        assert "n_from_trunk" not in run.data.metrics

        # with extras wanted: the baseline writes them beside the trunk, the re-extraction takes
        # its gram from there and computes pooled; the attribute step's check accepts them
        with_extras = {**overrides, "extract.extras": ["pooled", "gram"]}
        with_extras["attributes.gram_blocks"] = [0, 1]
        base = step.run(pre, extractor_uri=str(base_dir), overrides=with_extras, write_trunk=True)
        assert mlflow.get_run(base).data.tags[TAG_EXTRAS].startswith("yes: pooled+gram")
        uri = f"runs:/{base}/trunk"
        tuned = step.run(pre, extractor_uri=str(tuned_dir), overrides=with_extras, trunk_uri=uri)
        tags = mlflow.get_run(tuned).data.tags
        assert tags["imgsearch.trunk.reused"] == "true"
        assert "gram from the trunk's run" in tags[TAG_EXTRAS]
        folder = artifact_path(tuned, "extras")
        tuned_fp = fingerprint(finetuned_like(tiny_extractor()))
        assert extras_mismatch(read_meta(folder), ["pooled", "gram"], [0, 1], tuned_fp) == ""
        saved = load_extras(folder, ["gram"])
        base_gram = load_extras(artifact_path(base, "extras"), ["gram"])
        assert saved.ids == base_gram.ids == list(ids)
        np.testing.assert_array_equal(saved.features["gram"], base_gram.features["gram"])
    finally:
        mlflow.set_tracking_uri(None)


# --- extras beside the trunk -------------------------------------------------------------------

SPEC = ExtrasSpec(("pooled", "gram"), (0, 1))  # both Gram blocks inside the trunk (K = 2)


def _saved(result: object, folder: Path, ext: Extractor, kinds: tuple[str, ...] = SPEC.kinds):
    writer = result.writer  # type: ignore[attr-defined]
    assert isinstance(writer, ExtrasWriter), writer
    spec = ExtrasSpec(kinds, SPEC.gram_blocks)
    return load_extras(
        writer.save_extras(folder, spec, {"extractor_fingerprint": fingerprint(ext)}), kinds
    )


def test_extras_ride_along_the_trunk_and_its_re_extraction(
    catalog: pd.DataFrame, tmp_path: Path, count: list[Counter]
) -> None:
    """The writing pass keeps the extras of the plain pass; the re-extraction computes pooled in
    its partial pass and takes gram from them: both equal a full pass of the fine-tuned extractor
    (float16 tolerance), the frozen blocks seeing only the check rows, the failed row still one (no extras)."""
    base = tiny_extractor()
    written, path = extract_writing_trunk(
        base, catalog, CFG, tmp_path / "trunk", K, "float16", progress=False, extras=SPEC
    )
    plain = extract(base, catalog, CFG, progress=False, extras=SPEC)
    base_extras = _saved(written, tmp_path / "base_extras", base)
    reference = _saved(plain, tmp_path / "plain_extras", base)
    assert base_extras.ids == reference.ids == list(plain.ids)
    for kind in SPEC.kinds:
        np.testing.assert_array_equal(base_extras.features[kind], reference.features[kind])

    store = TrunkStore(path)
    tuned = finetuned_like(base)
    gram, why = gram_source(tmp_path / "base_extras", store, tuned, SPEC)
    assert why == "" and gram is not None
    counter = Counter(tuned)
    count.append(counter)
    res = extract_from_trunk(tuned, catalog, CFG, store, progress=False, extras=SPEC, gram=gram)
    assert counter.images == CHECK_ROWS  # the unreadable row fails again before the blocks
    assert list(res.failures[schema.IMAGE_ID]) == ["broken"]
    got = _saved(res, tmp_path / "tuned_extras", tuned)
    full = _saved(
        extract(tuned, catalog, CFG, progress=False, extras=SPEC), tmp_path / "full", tuned
    )
    assert got.ids == full.ids == list(res.ids)
    for kind in SPEC.kinds:
        np.testing.assert_allclose(got.features[kind], full.features[kind], rtol=1e-2, atol=5e-3)


def test_gram_from_the_trunks_run_only_when_it_can_stand_for_this_extractor(
    catalog: pd.DataFrame, tmp_path: Path
) -> None:
    base = tiny_extractor()
    written, path = extract_writing_trunk(
        base, catalog, CFG, tmp_path / "trunk", K, "float16", progress=False, extras=SPEC
    )
    folder = tmp_path / "extras"
    _saved(written, folder, base)
    store, tuned = TrunkStore(path), finetuned_like(base)
    assert gram_source(None, store, tuned, SPEC)[1] == "the trunk's run wrote no extras"
    late = ExtrasSpec(("gram",), (0, 2))  # block 2 trains: its Gram statistics change
    assert "after the trunk" in gram_source(folder, store, tuned, late)[1]
    assert "gram_blocks" in gram_source(folder, store, tuned, ExtrasSpec(("gram",), (1,)))[1]
    assert "fingerprint" in gram_source(folder, store, tiny_extractor(seed=5), SPEC)[1]
    with pytest.raises(ConfigError, match="gram"):
        extract_from_trunk(tuned, catalog, CFG, store, progress=False, extras=SPEC)
    # gram alone: the partial pass adds nothing, the writer holds the baseline's rows
    gram, _ = gram_source(folder, store, tuned, SPEC)
    only = ExtrasSpec(("gram",), SPEC.gram_blocks)
    res = extract_from_trunk(tuned, catalog, CFG, store, progress=False, extras=only, gram=gram)
    assert gram is not None
    saved = _saved(res, tmp_path / "only", tuned, ("gram",))
    np.testing.assert_array_equal(saved.features["gram"], gram.features["gram"].astype(np.float16))
