"""What a fine-tuning step feeds the network: images, batches, and the frozen-trunk cache.

- :func:`load_images`: manifest rows as uint8 ``(N, 3, S, S)``, read by the embedding reader
  (:class:`imgsearch.embed.reader.ImageDataset`: ``pre_path`` when it was made with exactly this
  preprocessing, else ``path`` decoded), unreadable rows as quarantine rows (stage ``finetune``).
- :func:`split_at` / :func:`trunk_outputs`: without pixel augmentation the frozen blocks always see
  the same inputs, so their outputs are computed once and each step runs only the rest.
- :class:`TrainInputs`: the train and val data of a run, and how train indices become fresh views
  and embeddings through the trained model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.embed.reader import ImageDataset, ReadItem, collate, failure_row, manifest_column
from imgsearch.embed.trunk import TrunkStore
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import REGISTRY, Extractor, backbone_blocks
from imgsearch.train.augment import augment_batch, train_transform
from imgsearch.train.config import CACHE_DTYPES, FinetuneConfig
from imgsearch.train.precision import train_autocast

log = logging.getLogger(__name__)

FAILURE_STAGE = "finetune"
#: Rows read per batch when images are loaded whole (the reader's batching, not the training's).
READ_BATCH = 64
#: Rows copied at a time from a trunk artifact into the training tensor.
STORE_CHUNK = 2048

Loaded = tuple[torch.Tensor, np.ndarray, pd.DataFrame]


# --- images ---------------------------------------------------------------------------------------


def _failure(manifest: pd.DataFrame, item: ReadItem) -> dict[str, object]:
    reason = "finetune_read_failed" if item.reason == "extract_read_failed" else item.reason
    row = failure_row(manifest, item.index, reason, item.detail, item.detected_format)
    row[schema.STAGE] = FAILURE_STAGE
    log.warning("finetune: cannot read %s (%s)", row[schema.IMAGE_ID], item.detail)
    return row


def _batches(
    manifest: pd.DataFrame,
    cfg: PreprocessConfig,
    batch_size: int,
    failures: list[dict[str, object]],
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(row positions, uint8 (B, 3, S, S) contiguous)`` per batch of the embedding reader's
    dataset; the rows it could not read are appended to ``failures`` as quarantine rows.

    Not through :class:`~imgsearch.embed.reader.ManifestReader`'s ``DataLoader``: each of its
    iterations draws a seed from the global RNG, which would shift the seeded training stream.
    """
    paths = manifest_column(manifest, schema.PATH)
    dataset = ImageDataset(paths, manifest_column(manifest, schema.PRE_PATH), cfg)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        failures.extend(_failure(manifest, item) for item in batch.failed)
        if batch.indices:
            yield batch.indices, batch.pixels.permute(0, 3, 1, 2).contiguous()


def load_images(manifest: pd.DataFrame, cfg: PreprocessConfig) -> Loaded:
    """Read every row as uint8 ``(3, S, S)`` with preprocessing ``cfg``.

    Returns ``(images (N_ok, 3, S, S) uint8, ok mask (N,), failures)`` where failures is a
    quarantine table (stage ``finetune``) of the unreadable rows. ``pre_path`` is used only when
    its cache folder is ``cfg``'s cache key (the same preprocessing), else ``path`` is decoded.
    """
    size = cfg.size
    out = torch.empty((len(manifest), 3, size, size), dtype=torch.uint8)
    ok = np.zeros(len(manifest), dtype=bool)
    failures: list[dict[str, object]] = []
    for indices, pixels in _batches(manifest, cfg, READ_BATCH, failures):
        out[indices] = pixels
        ok[indices] = True
    return out[torch.from_numpy(ok)], ok, schema.quarantine_rows(failures)


def normaliser(cfg: PreprocessConfig) -> v2.Compose:
    """uint8 -> float in [0, 1] -> normalised with ``cfg``'s mean and std."""
    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    )


# --- the frozen-trunk cache -----------------------------------------------------------------------


class Top(nn.Module):
    """The blocks after the frozen trunk, then what :class:`Extractor` does after its body:
    global average pooling and L2 normalisation. Shares its blocks with the model it came from."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x)
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return torch.nn.functional.normalize(pooled.float(), dim=1)


def split_at(model: Extractor, k: int) -> tuple[nn.Sequential, Top]:
    """``(trunk, top)``: blocks ``[:k]`` and the rest, with ``top(trunk(x)) == model(x)``.

    Works for backbones whose registry entry declares ``pooled_blocks`` (the body is its blocks
    then global average pooling, e.g. torchvision's MobileNetV2); checked on a probe input,
    :class:`ConfigError` otherwise.
    """
    entry = REGISTRY.get(model.spec.name)
    blocks = backbone_blocks(model)
    if entry is None or not entry.pooled_blocks or not 0 < k < len(blocks):
        raise ConfigError(
            f"caching frozen blocks needs a backbone that is its blocks then pooling, and 0 < k < "
            f"its block count; {model.spec.name!r} with freeze_blocks={k} does not qualify"
        )
    trunk, top = nn.Sequential(*blocks[:k]), Top(blocks[k:])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        same = torch.allclose(top(trunk(probe)), model(probe), atol=1e-5)
    model.train(was_training)
    if not same:
        raise ConfigError(
            f"backbone {model.spec.name!r} is not `features` + average pooling: its frozen blocks "
            "cannot be cached (use augmentation, or freeze_blocks: 0)"
        )
    return trunk, top


@torch.no_grad()
def trunk_outputs(
    rows: pd.DataFrame,
    cfg: PreprocessConfig,
    trunk: nn.Module,
    batch_size: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> Loaded:
    """Images of ``rows`` through the frozen ``trunk``, a batch at a time (images are not kept).

    Returns ``(outputs (N_ok, C, h, w) in dtype, ok mask (N,), failures)`` like :func:`load_images`.
    """
    trunk.eval()
    normalise = normaliser(cfg)
    ok = np.zeros(len(rows), dtype=bool)
    failures: list[dict[str, object]] = []
    outs = []
    # the frozen blocks run once over every train and val image: minutes on a CPU, so show it
    with tqdm(total=len(rows), desc="frozen blocks (once)", unit="img", mininterval=2.0) as bar:
        for indices, pixels in _batches(rows, cfg, batch_size, failures):
            ok[indices] = True
            x = normalise(pixels)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(trunk(x).to(dtype).contiguous())
            bar.update(len(pixels))
    failed = schema.quarantine_rows(failures) if failures else schema.empty_quarantine()
    if not outs:
        return torch.zeros((0, 1, 1, 1), dtype=dtype), ok, failed
    return torch.cat(outs), ok, failed


# --- a run's inputs -------------------------------------------------------------------------------


@dataclass
class TrainInputs:
    """The train and val data of a run (uint8 images, or the frozen trunk's outputs when ``top``
    is set), the item codes of the train images and the item labels of the val images.
    ``attribute_codes``: for each column of ``attribute_loss``, the train images' class codes
    (``-1`` where the catalog has no value)."""

    model: Extractor
    train_x: torch.Tensor
    val_x: torch.Tensor
    codes: np.ndarray
    val_labels: np.ndarray
    failures: pd.DataFrame
    normalise: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable[[torch.Tensor], torch.Tensor] | None  # None: no pixel augmentation
    top: Top | None
    memory_format: torch.memory_format
    n_from_trunk: int = 0  # rows whose frozen-block outputs came from a trunk artifact
    attribute_codes: dict[str, np.ndarray] = field(default_factory=dict)
    bf16: bool = False  # training steps' forward (and so backward) under bfloat16 autocast

    @property
    def n_items(self) -> int:
        return int(self.codes.max()) + 1 if len(self.codes) else 0

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Fresh (augmented, when there is augmentation) normalised views of train images ``idx``."""
        if self.transform is None:
            x = self.normalise(self.train_x[idx])
        else:
            x = augment_batch(self.train_x[idx], self.transform)
        return x.contiguous(memory_format=self.memory_format)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32) of fresh views of train images ``idx`` through the trained model;
        with ``bf16`` its convolutions compute in bfloat16 (the weights stay float32)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.top is not None:
                x = self.train_x[idx].float().contiguous(memory_format=self.memory_format)
                out = self.top(x)
            else:
                out = self.model(self.pixels(idx))
        return out.float()

    def encode_val(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of ``val_x`` (the model in eval mode)."""
        self.model.eval()
        if self.top is not None:
            return self.top(batch.float().contiguous(memory_format=self.memory_format))
        return self.model(self.normalise(batch).contiguous(memory_format=self.memory_format))


def _split_rows(manifest: pd.DataFrame, name: str) -> pd.DataFrame:
    return manifest[manifest[schema.SPLIT].astype(str) == name].reset_index(drop=True)


def _trunk(model: Extractor, cfg: FinetuneConfig) -> tuple[nn.Sequential, Top] | None:
    """The frozen trunk and the rest when ``cfg`` caches it and the backbone allows it."""
    if not cfg.caches_trunk(model.spec.name):
        return None
    try:
        return split_at(model, cfg.blocks_to_freeze(model.spec.name))
    except ConfigError as err:  # train as usual, only slower: every step runs every block
        log.warning("finetune: frozen blocks not cached: %s", err)
        return None


def attribute_codes(rows: pd.DataFrame, columns: Iterable[str]) -> dict[str, np.ndarray]:
    """``column -> (len(rows),)`` int64 class codes of ``rows`` (``-1`` where missing).
    :class:`ConfigError` for a column the manifest lacks or one with fewer than 2 classes."""
    out: dict[str, np.ndarray] = {}
    for column in columns:
        if column not in rows.columns:
            raise ConfigError(
                f"finetune.attribute_loss names {column!r}, which the manifest does not have "
                f"(columns: {sorted(rows.columns)})"
            )
        values = rows[column].astype("string")  # missing stays <NA>: code -1
        codes = pd.factorize(values, use_na_sentinel=True)[0].astype(np.int64)
        if int(codes.max(initial=-1)) + 1 < 2:
            raise ConfigError(
                f"finetune.attribute_loss: {column!r} has fewer than 2 classes in the train split"
            )
        out[column] = codes
    return out


def stored_trunk_outputs(
    rows: pd.DataFrame,
    store: TrunkStore,
    compute: Callable[[pd.DataFrame], Loaded],
) -> tuple[torch.Tensor, np.ndarray, pd.DataFrame, int]:
    """:func:`trunk_outputs` of ``rows`` taken from ``store`` where it holds them (same image
    id and sha256), ``compute(missing rows)`` for the rest; also returns how many came from it."""
    positions = store.positions(rows)
    have = positions >= 0
    if not have.any():
        return (*compute(rows), 0)
    missing = np.flatnonzero(~have)
    ok = have.copy()
    failed = schema.empty_quarantine()
    computed: torch.Tensor | None = None
    if len(missing):
        computed, computed_ok, failed = compute(rows.iloc[missing].reset_index(drop=True))
        ok[missing[computed_ok]] = True
    first = store.rows(positions[have][:1])
    out = torch.empty((int(ok.sum()), *first.shape[1:]), dtype=first.dtype)
    rank = np.cumsum(ok) - 1  # row i of rows -> row rank[i] of out
    stored = np.flatnonzero(have)
    for start in range(0, len(stored), STORE_CHUNK):  # in chunks: never two copies in memory
        chunk = stored[start : start + STORE_CHUNK]
        out[torch.from_numpy(rank[chunk])] = store.rows(positions[chunk])
    if computed is not None and len(computed):
        out[torch.from_numpy(rank[missing[computed_ok]])] = computed.to(first.dtype)
    return out, ok, failed, int(have.sum())


def prepare_inputs(
    model: Extractor,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    trunk: TrunkStore | None = None,
) -> TrainInputs:
    """Read the ``train`` and ``val`` rows of ``manifest`` at ``model``'s resolution (through the
    frozen trunk when it is cached). Raises :class:`ConfigError` with fewer than 2 train items.

    ``trunk``: the baseline extraction's trunk artifact (:mod:`imgsearch.embed.trunk`); used when
    the frozen blocks are cached and its fingerprint is that of ``model``'s frozen blocks at
    ``cache_dtype``, so their outputs are read instead of computed (the rows it lacks are
    computed as before)."""
    pre_cfg = model.spec.preprocess
    bf16, reason = train_autocast(cfg.train_dtype)
    if cfg.train_dtype != "float32":
        log.info("finetune: %s", reason)
    train_rows, val_rows = _split_rows(manifest, "train"), _split_rows(manifest, "val")
    split = _trunk(model, cfg)
    n_from_trunk = 0
    if split is not None:
        args = (split[0], cfg.eval_batch_size, CACHE_DTYPES[cfg.cache_dtype], cfg.channels_last)
        k = cfg.blocks_to_freeze(model.spec.name)
        if (
            trunk is not None
            and (trunk.blocks, trunk.dtype) == (k, cfg.cache_dtype)
            and (trunk.matches(model))
        ):

            def compute(rows: pd.DataFrame) -> Loaded:
                return trunk_outputs(rows, pre_cfg, *args)

            train_x, train_ok, train_fail, n_train = stored_trunk_outputs(
                train_rows, trunk, compute
            )
            val_x, val_ok, val_fail, n_val = stored_trunk_outputs(val_rows, trunk, compute)
            n_from_trunk = n_train + n_val
            log.info(
                "finetune: frozen blocks' outputs of %d images from the trunk artifact",
                n_from_trunk,
            )
        else:
            if trunk is not None:
                log.warning(
                    "finetune: the trunk artifact was made by another frozen part "
                    "(blocks %d, %s, fingerprint differs): computing the outputs",
                    trunk.blocks,
                    trunk.dtype,
                )
            train_x, train_ok, train_fail = trunk_outputs(train_rows, pre_cfg, *args)
            val_x, val_ok, val_fail = trunk_outputs(val_rows, pre_cfg, *args)
    else:
        train_x, train_ok, train_fail = load_images(train_rows, pre_cfg)
        val_x, val_ok, val_fail = load_images(val_rows, pre_cfg)
    codes = pd.factorize(train_rows.loc[train_ok, schema.ITEM_ID].astype(str))[0]
    if (int(codes.max()) + 1 if len(codes) else 0) < 2:
        raise ConfigError(
            "finetune needs at least 2 train items with readable images, "
            f"got {int(codes.max()) + 1 if len(codes) else 0}"
        )
    failures = (
        pd.concat([train_fail, val_fail], ignore_index=True)
        if len(train_fail) or len(val_fail)
        else schema.empty_quarantine()
    )
    normalise = normaliser(pre_cfg)
    aug = cfg.augment_config()
    size, mean, std = pre_cfg.size, pre_cfg.mean, pre_cfg.std
    return TrainInputs(
        model=model,
        train_x=train_x,
        val_x=val_x,
        codes=codes,
        val_labels=val_rows.loc[val_ok, schema.ITEM_ID].astype(str).to_numpy(),
        failures=failures,
        normalise=normalise,
        transform=train_transform(aug, size, mean, std) if aug is not None else None,
        top=split[1] if split is not None else None,
        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
        n_from_trunk=n_from_trunk,
        attribute_codes=attribute_codes(
            train_rows.loc[train_ok].reset_index(drop=True), cfg.attribute_loss
        ),
        bf16=bf16,
    )


def describe(inputs: TrainInputs, cfg: FinetuneConfig) -> str:
    """How the run's inputs are made, for the log."""
    dtype = "bfloat16" if inputs.bf16 else "float32"
    if inputs.top is not None:
        return f"blocks [:{cfg.blocks_to_freeze(inputs.model.spec.name)}] cached, {dtype} steps"
    return ("augmented" if cfg.augment is not False else "not augmented") + f", {dtype} steps"
