"""Features beyond the retrieval embedding, for attribute heads: pooled and style statistics.

A retrieval embedding fine-tuned to find *the same emoji by another vendor* learns to ignore the
drawing style, so a style head cannot read it alone. One forward pass of the extractor gives,
besides its embedding, the sets :mod:`imgsearch.models.attribute_heads` may ask for:

* ``pooled``: the backbone's global-average-pooled features, before any projection head
  (``(N, D_body)``; the same as the embedding for an extractor without a head);
* ``gram``: style statistics of intermediate blocks (Gatys et al. 2016, "Image Style Transfer
  Using Convolutional Neural Networks"): for each block ``b`` of ``gram_blocks`` (indices into
  :func:`imgsearch.models.backbones.backbone_blocks`), with ``F`` its ``(C, H*W)`` output, the
  upper triangle of ``G = F F^T / (H W)`` plus each channel's mean and standard deviation, all
  signed-square-rooted (power normalisation of second-order features); the blocks concatenated.

Images are read exactly as batch extraction reads them (:class:`~imgsearch.embed.reader.ManifestReader`),
and a query image as serving reads it (``to_uint8`` + ``to_tensor``), so heads see the same
numbers in training and at query time. An unreadable file becomes a failure row, never a drop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from imgsearch import schema
from imgsearch.data.preprocess import images_to_tensor, to_tensor
from imgsearch.embed.reader import ManifestReader, failure_row
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, backbone_blocks, embed_pooled

log = logging.getLogger(__name__)

EXTRA_KINDS = ("pooled", "gram")


def gram_stats(fmap: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C (C + 1) / 2 + 2 C)``: Gram upper triangle, channel means and
    standard deviations, signed-square-rooted."""
    b, c, h, w = fmap.shape
    flat = fmap.float().reshape(b, c, h * w)
    gram = flat @ flat.transpose(1, 2) / float(h * w)
    rows, cols = torch.triu_indices(c, c)
    parts = torch.cat([gram[:, rows, cols], flat.mean(dim=2), flat.std(dim=2)], dim=1)
    return torch.sign(parts) * torch.sqrt(parts.abs())


def _hook_target(block: nn.Module) -> nn.Module:
    """A block that is a plain list of modules (a ResNet/EfficientNet stem) is never called as
    one: hook its last member."""
    if isinstance(block, nn.ModuleList):
        return list(block.children())[-1]
    return block


class _Enough(Exception):
    """Raised by the last needed block's hook: the rest of the forward pass is not needed."""


@contextmanager
def _captured(
    extractor: Extractor, blocks: Sequence[int], stop_after: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """The outputs of ``blocks``, filled by forward hooks; ``stop_after``: the last of them
    raises :class:`_Enough` once every block is captured (only block outputs are wanted)."""
    layout = backbone_blocks(extractor)
    bad = [b for b in blocks if not -len(layout) <= b < len(layout)]
    if bad:
        raise ConfigError(f"gram_blocks {bad}: {extractor.spec.name} has {len(layout)} blocks")
    out: dict[int, torch.Tensor] = {}
    handles = []
    wanted = {b % len(layout) for b in blocks}
    for b in blocks:

        def hook(_m: nn.Module, _i: object, o: torch.Tensor, b: int = b) -> None:
            out[b] = o
            if stop_after and {k % len(layout) for k in out} >= wanted:
                raise _Enough

        handles.append(_hook_target(layout[b]).register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def features_of(
    extractor: Extractor, x: torch.Tensor, kinds: Sequence[str], gram_blocks: Sequence[int] = ()
) -> dict[str, np.ndarray]:
    """``x`` ``(N, 3, S, S)`` normalised as the extractor's spec says -> ``{kind: (N, D)}`` for
    ``kinds`` among ``embedding``, ``pooled``, ``gram`` (one forward pass)."""
    unknown = sorted(set(kinds) - {"embedding", *EXTRA_KINDS})
    if unknown:
        raise ConfigError(f"feature kinds {unknown} are not embedding, pooled or gram")
    if "gram" in kinds and not gram_blocks:
        raise ConfigError("gram features need at least one block in gram_blocks")
    blocks = list(gram_blocks) if "gram" in kinds else []
    only_blocks = bool(blocks) and not {"embedding", "pooled"} & set(kinds)
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode(), _captured(extractor, blocks, only_blocks) as maps:
        try:
            body = extractor.body(x)
        except _Enough:  # Gram statistics alone: the blocks after the last one are skipped
            pass
        else:
            if body.ndim != 2:
                body = torch.flatten(F.adaptive_avg_pool2d(body, 1), 1)
            pooled = F.normalize(body.float(), dim=1)
            emb = embed_pooled(pooled, extractor.head, extractor.spec.backbone_weight)
            if "embedding" in kinds:
                out["embedding"] = emb.cpu().numpy()
            if "pooled" in kinds:
                out["pooled"] = pooled.cpu().numpy()
        if blocks:
            out["gram"] = torch.cat([gram_stats(maps[b]) for b in blocks], dim=1).cpu().numpy()
    return out


def image_features(
    extractor: Extractor,
    images: Sequence[Image.Image],
    kinds: Sequence[str],
    gram_blocks: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Decoded query images -> ``{kind: (N, D)}``, preprocessed the way serving embeds them."""
    pixels = images_to_tensor(images, extractor.spec.preprocess)
    device = next(extractor.parameters()).device
    was_training = extractor.training
    extractor.eval()
    try:
        return features_of(extractor, pixels.to(device), kinds, gram_blocks)
    finally:
        extractor.train(was_training)


@dataclass
class ManifestFeatures:
    ids: list[str]
    features: dict[str, np.ndarray]
    failures: pd.DataFrame  # quarantine schema, stage "extract"


def manifest_features(
    extractor: Extractor,
    manifest: pd.DataFrame,
    kinds: Sequence[str],
    gram_blocks: Sequence[int] = (),
    batch_size: int = 64,
    progress: bool = True,
) -> ManifestFeatures:
    """Every readable row of ``manifest`` (``image_id``, ``path``, optional ``pre_path``) ->
    ``{kind: (n_ok, D)}`` in row order; unreadable rows are failure rows."""
    for column in (schema.IMAGE_ID, schema.PATH):
        if column not in manifest.columns:
            raise ConfigError(f"manifest has no {column!r} column")
    manifest = manifest.reset_index(drop=True)
    reader = ManifestReader(extractor.spec.preprocess, batch_size)
    ids: list[str] = []
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    failures: list[dict[str, object]] = []
    was_training = extractor.training
    extractor.eval()
    try:
        with tqdm(total=len(manifest), desc="features", unit="img", disable=not progress) as bar:
            for batch in reader(manifest):
                for item in batch.failed:
                    failures.append(
                        failure_row(
                            manifest, item.index, item.reason, item.detail, item.detected_format
                        )
                    )
                if batch.indices:
                    x = to_tensor(batch.pixels, extractor.spec.preprocess)
                    for kind, arr in features_of(extractor, x, kinds, gram_blocks).items():
                        chunks[kind].append(arr)
                    ids += [str(manifest.at[i, schema.IMAGE_ID]) for i in batch.indices]
                bar.update(len(batch.indices) + len(batch.failed))
    finally:
        extractor.train(was_training)
    feats = {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in chunks.items()}
    return ManifestFeatures(ids, feats, schema.quarantine_rows(failures))
