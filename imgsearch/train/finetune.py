"""Contrastive fine-tuning of a feature extractor, early-stopped on validation retrieval.

Methods (``FinetuneConfig.method``):

- ``supcon`` (Khosla et al. 2020), item-aware: batches are P items x K images (PK sampling); the
  other images of the same item are the positives (:func:`imgsearch.train.losses.supcon_loss`). An
  item with fewer than K images is topped up with repeats of its images, which differ by their
  augmentation. Uses the item labels of the train split, which is what a catalogue of items
  with several images gives for free.
- ``simclr`` (Chen et al. 2020): two augmented views per image, NT-Xent; no labels.
- ``moco`` (MoCo v2): two views, queries from the trained encoder, keys from a momentum copy,
  negatives from a queue; no labels.

Only the ``train`` split trains. Before training (epoch 0) and after every epoch the ``val``
split is embedded and ranked (each val image queries the other val images, relevant = same item;
the protocol of :mod:`imgsearch.evaluate.retrieval`) and the epoch's row of the history gets, for the
embedding the returned extractor would produce: ``val_map_at_r``, ``val_map``,
``val_recall_at_1`` (top-1 hit rate, the metric-learning "Recall@1"), ``val_embedding_std``
(mean per-dimension std of the L2-normalised embeddings: 0 when they collapse to a point, about
``1/sqrt(D)`` when spread); and ``val_map_at_r_backbone`` / ``val_map_at_r_head`` (MAP@R of the
backbone embedding and of the projection head's output, side by side), the mean ``loss``, ``lr``,
``images_per_s`` (views through the trained layers per second) and ``epoch_seconds``. The best
epoch by ``val_map_at_r`` is kept - epoch 0 included, so a fine-tuning that does not help returns
the extractor unchanged - and training stops after ``patience`` epochs without improvement, or
when the next epoch would overrun ``max_minutes``.

Projection head: measured on the emoji demo (supcon, frozen blocks cached, see
``configs/finetune.yaml``), the head's output ranks far better than the backbone embedding under
it (val MAP@R 0.72 vs 0.66 after 10 epochs), and training without a head is worse still (0.59):
the pooled backbone features are non-negative (ReLU6) and share a large common component that
cosine similarity cannot discount, while the head centres and selects. So ``keep_head: true``
returns an extractor that embeds through the trained head (``ExtractorSpec.head`` records it,
:func:`imgsearch.models.backbones.load_extractor` rebuilds it); ``keep_head: false`` drops it, as SimCLR
does for transfer (the representation *under* the head transfers better to other tasks).

Resolution and cost: ``train_size`` replaces the extractor's input size for training and then
for extraction (the returned ``spec.preprocess.size`` says so). With pixel augmentation every
step runs the whole network; without it (``augment: false``, supcon: the positives are the
other images of each item) the frozen blocks' outputs are computed once and only the trainable
blocks run per step, which makes the extractor's own 224 px affordable on a CPU. Pretrained
features lose much at low resolution (emoji test MAP@R of ImageNet MobileNetV2: 0.36 at 224 px,
0.27 at 96 px), which is why the demo recipe keeps 224 px and caches blocks ``[:13]``.

Images are read as uint8 at the training size: from ``pre_path`` when the cached array was made
with exactly that preprocessing (its cache folder is that config's key), else by decoding
``path`` (:func:`imgsearch.data.imageio.open_rgb` + :func:`imgsearch.data.preprocess.to_uint8`), which is
what extraction will do. An unreadable image becomes a quarantine row (``failures``) and is
counted (``n_unreadable``); training goes on.

Checkpoints: with ``checkpoint_dir`` set, ``last.pt`` is written atomically after each epoch
(model, projection head, MoCo state, optimizer, scheduler, RNG states, history, best state so far)
with ``torch.save`` of plain tensors and containers, and read back with
``torch.load(weights_only=True)``: a checkpoint that needs arbitrary unpickling is refused with
:class:`CheckpointError`. Calling :func:`finetune` again with the same config, extractor and
``checkpoint_dir`` resumes after the last finished epoch; a finished run returns its result.
Resumed training reproduces an uninterrupted run (same data order, augmentations and updates) up
to floating-point non-determinism of the kernels.

The library never logs to a tracker: ``on_epoch(epoch, row)`` is how a caller records curves.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.preprocess import PreprocessConfig, load_uint8, to_uint8
from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.evaluate import metrics as M
from imgsearch.evaluate.retrieval import rank_relevance
from imgsearch.models.backbones import Extractor, fingerprint, projection_head
from imgsearch.paths import atomic_writer
from imgsearch.train.augment import AugmentConfig, as_augment_config, augment_batch, train_transform
from imgsearch.train.losses import MoCo, nt_xent_loss, supcon_loss

log = logging.getLogger(__name__)

METHODS = ("supcon", "simclr", "moco")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
#: Config fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = ("checkpoint_dir", "max_minutes")


class CheckpointError(ImgsearchError):
    """A fine-tuning checkpoint cannot be used (not plain tensors/containers, or not ours)."""


@dataclass
class FinetuneConfig:
    """How to fine-tune. See the module docstring for what each method does.

    - ``method``: ``supcon`` | ``simclr`` | ``moco``; ``temperature`` of its loss.
    - ``epochs``, ``batch_size`` (images per step; for supcon ``batch_size // images_per_item``
      items of ``images_per_item`` images each), ``lr``, ``weight_decay`` (not on biases and
      norm weights), ``optimizer`` (``adamw`` | ``sgd`` with momentum 0.9), a linear
      ``warmup_epochs`` then cosine decay to 0, stepped every batch.
    - ``head_dims``: the projection head's layer widths, e.g. ``[512, 128]`` = Linear(D, 512),
      BN, ReLU, Linear(512, 128); ``[]`` puts the loss on the backbone embedding itself.
      ``keep_head``: the returned extractor embeds through the trained head (and early stopping
      watches that embedding); otherwise the head is dropped after training.
    - ``freeze_blocks``: the first k blocks of the backbone (``features[:k]`` of MobileNetV2)
      stay fixed; an integer, or a mapping from backbone name to k (``default`` for the others),
      since backbones have different numbers of blocks; ``freeze_bn``: BatchNorm statistics of the backbone stay fixed (small
      batches make poor statistics; MoCo needs it in place of shuffled BN).
    - ``train_size``: training and (then) extraction resolution; ``None`` keeps the extractor's.
    - ``min_embedding_std``: an epoch whose val embeddings have collapsed (``val_embedding_std``
      below this) is never kept, whatever its MAP@R: ties among identical embeddings rank by
      chance, and a tiny val split can make that look like an improvement.
    - ``patience``/``min_delta``: early stopping on ``val_map_at_r``; ``val_max_queries``: rank
      only this many seeded val queries (against all val images) on large val splits.
    - ``moco_queue_size``/``moco_momentum``: MoCo's queue length and key-encoder momentum.
    - ``images_per_item``: K of PK sampling (supcon).
    - ``augment``: :class:`~imgsearch.train.augment.AugmentConfig` fields overriding the paper preset of
      ``method`` (``None`` = the preset as published); ``False`` = no pixel augmentation (supcon
      only: its positives are the item's other images). Without augmentation the frozen blocks
      always see the same inputs, so (with ``cache_frozen``) their outputs are computed once
      and cached in ``cache_dtype`` and each step runs only the trainable blocks: the same
      training (exactly, with ``float32``), many times cheaper, which affords the extractor's
      full resolution. A backbone whose blocks cannot be split off that way (not ``features``
      then pooling) trains without the cache, every step through every block.
    - ``seed``; ``checkpoint_dir`` (``None`` = no checkpoints); ``max_minutes`` (``None`` = no
      time budget); ``eval_batch_size``; ``channels_last`` (NHWC convs, faster on CPU).
    """

    method: str = "supcon"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: float = 1.0
    temperature: float = 0.1
    head_dims: Sequence[int] = (512, 128)
    keep_head: bool = False
    freeze_blocks: int | dict[str, int] = 0
    freeze_bn: bool = True
    train_size: int | None = None
    patience: int = 5
    min_delta: float = 0.0
    min_embedding_std: float = 1e-4
    val_max_queries: int | None = None
    moco_queue_size: int = 4096
    moco_momentum: float = 0.99
    images_per_item: int = 4
    augment: dict[str, Any] | bool | None = None
    cache_frozen: bool = True
    cache_dtype: str = "float16"
    seed: int = 0
    checkpoint_dir: str | None = None
    max_minutes: float | None = None
    eval_batch_size: int = 128
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"finetune.method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"finetune.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        for name, low in (
            ("epochs", 1),
            ("batch_size", 2),
            ("images_per_item", 1),
            ("eval_batch_size", 1),
        ):
            _check_int(self, name, low)
        for name in ("patience", "seed"):
            _check_int(self, name, 0)
        if isinstance(self.freeze_blocks, Mapping):
            self.freeze_blocks = {str(k): v for k, v in self.freeze_blocks.items()}
            for key, k in self.freeze_blocks.items():
                if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                    raise ConfigError(
                        f"finetune.freeze_blocks.{key} must be an integer >= 0, got {k!r}"
                    )
        else:
            _check_int(self, "freeze_blocks", 0)
        _check_int(self, "moco_queue_size", 1)
        if self.train_size is not None:
            _check_int(self, "train_size", 8)
        if self.val_max_queries is not None:
            _check_int(self, "val_max_queries", 1)
        for name in ("lr", "temperature"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"finetune.{name} must be > 0, got {value}")
            setattr(self, name, value)
        for name in ("weight_decay", "warmup_epochs", "min_delta", "min_embedding_std"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"finetune.{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.moco_momentum = float(self.moco_momentum)
        if not 0.0 <= self.moco_momentum < 1.0:
            raise ConfigError(f"finetune.moco_momentum must be in [0, 1), got {self.moco_momentum}")
        if self.max_minutes is not None:
            self.max_minutes = float(self.max_minutes)
            if not self.max_minutes > 0:
                raise ConfigError(
                    f"finetune.max_minutes must be > 0 or null, got {self.max_minutes}"
                )
        self.head_dims = tuple(int(d) for d in self.head_dims)
        if any(d < 1 for d in self.head_dims):
            raise ConfigError(f"finetune.head_dims must be positive, got {self.head_dims}")
        if self.method == "supcon" and self.batch_size // self.images_per_item < 2:
            raise ConfigError(
                "finetune: supcon needs at least 2 items per batch "
                f"(batch_size {self.batch_size} // images_per_item {self.images_per_item} < 2)"
            )
        if self.augment is True:
            self.augment = None
        if self.augment is not None and not isinstance(self.augment, (dict, bool)):
            raise ConfigError(
                "finetune.augment must be a mapping of AugmentConfig fields, null or false"
            )
        if self.augment is False and self.method != "supcon":
            raise ConfigError(
                f"finetune.augment=false leaves {self.method} without positives: "
                "its two views come from augmentation (use method supcon)"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"finetune.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        self.augment_config()  # validate now, not at the first epoch

    def augment_config(self) -> AugmentConfig | None:
        """The augmentation recipe, or ``None`` when ``augment`` is false."""
        if self.augment is False:
            return None
        return as_augment_config(
            self.augment if isinstance(self.augment, dict) else None, self.method
        )

    def blocks_to_freeze(self, backbone: str) -> int:
        """``freeze_blocks`` for ``backbone``: the integer, or the mapping's entry for that name
        (else its ``default``, else 0)."""
        if isinstance(self.freeze_blocks, Mapping):
            return int(self.freeze_blocks.get(backbone, self.freeze_blocks.get("default", 0)))
        return int(self.freeze_blocks)

    def caches_trunk(self, backbone: str) -> bool:
        """True when the frozen blocks' outputs are computed once (no augmentation, frozen blocks)."""
        return self.augment is False and self.blocks_to_freeze(backbone) > 0 and self.cache_frozen

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): what a checkpoint stores and compares on resume."""
        out = dataclasses.asdict(self)
        out["head_dims"] = list(self.head_dims)
        aug = self.augment_config()
        out["augment"] = False if aug is None else aug.to_dict()
        return out


def _check_int(cfg: FinetuneConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"finetune.{name} must be an int >= {low}, got {value!r}")


@dataclass
class FinetuneResult:
    """``extractor``: the best epoch's (eval mode, spec with the training resolution; with the
    trained projection head when ``keep_head``). ``history``: one row per epoch (0 = before
    training). ``metrics``: the summary (``best_epoch``, ``best_val_map_at_r``,
    ``initial_val_map_at_r``, ...). ``failures``: quarantine rows of unreadable images."""

    extractor: Extractor
    history: pd.DataFrame
    metrics: dict[str, float]
    stop_reason: str = ""
    failures: pd.DataFrame = field(default_factory=schema.empty_quarantine)


# --- images ---------------------------------------------------------------------------------------


def load_images(
    manifest: pd.DataFrame, cfg: PreprocessConfig
) -> tuple[torch.Tensor, np.ndarray, pd.DataFrame]:
    """Read every row as uint8 ``(3, S, S)`` with preprocessing ``cfg``.

    Returns ``(images (N_ok, 3, S, S) uint8, ok mask (N,), failures)`` where failures is a
    quarantine table (stage ``finetune``) of the unreadable rows. ``pre_path`` is used only when
    its cache folder is ``cfg``'s cache key (the same preprocessing), else ``path`` is decoded.
    """
    size = cfg.size
    key = cfg.cache_key()
    out = torch.empty((len(manifest), 3, size, size), dtype=torch.uint8)
    ok = np.zeros(len(manifest), dtype=bool)
    failures: list[dict[str, object]] = []
    pre_paths = (
        manifest[schema.PRE_PATH].tolist()
        if schema.PRE_PATH in manifest.columns
        else [None] * len(manifest)
    )
    paths = (
        manifest[schema.PATH].tolist()
        if schema.PATH in manifest.columns
        else [None] * len(manifest)
    )
    for i, (pre, path) in enumerate(zip(pre_paths, paths, strict=True)):
        arr: np.ndarray | None = None
        if isinstance(pre, str) and pre and Path(pre).parent.parent.name == key:
            try:
                cached = load_uint8(pre)
                if cached.dtype == np.uint8 and cached.shape == (size, size, 3):
                    arr = cached
            except (OSError, ValueError) as exc:
                log.debug("pre_path %s unreadable (%s); decoding the image", pre, exc)
        if arr is None:
            try:
                if not isinstance(path, str) or not path:
                    raise FileNotFoundError("no path in the manifest")
                arr = to_uint8(imageio.open_rgb(path), cfg)
            except Exception as exc:  # noqa: BLE001 - one bad file is a failure row, training goes on
                row = manifest.iloc[i]
                failures.append(
                    {
                        schema.IMAGE_ID: row.get(schema.IMAGE_ID),
                        schema.ITEM_ID: row.get(schema.ITEM_ID),
                        schema.URI: row.get(schema.URI),
                        schema.STAGE: "finetune",
                        schema.REASON: getattr(exc, "reason", "finetune_read_failed"),
                        schema.DETAIL: f"{type(exc).__name__}: {exc}",
                        schema.DETECTED_FORMAT: getattr(exc, "detected_format", None),
                    }
                )
                log.warning("finetune: cannot read %s (%s)", row.get(schema.IMAGE_ID), exc)
                continue
        arr = (
            np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
        )  # torch refuses read-only
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)
        ok[i] = True
    return out[torch.from_numpy(ok)], ok, schema.quarantine_rows(failures)


# --- batches --------------------------------------------------------------------------------------


def pk_batches(codes: np.ndarray, p: int, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of PK batches: every item once, in random order, P items x K images per batch.

    ``codes`` (N,) are the item codes of the images. An item with >= K images gives K distinct
    ones at random; one with fewer gives all of them plus random repeats. The last batch is
    dropped when it has fewer than P items (unless it is the only one).
    """
    codes = np.asarray(codes)
    members = [torch.from_numpy(np.flatnonzero(codes == c)) for c in np.unique(codes)]
    order = torch.randperm(len(members), generator=generator).tolist()
    p = min(p, len(members))
    batches = []
    for start in range(0, len(order) - p + 1, p):
        picks = []
        for item in order[start : start + p]:
            m = members[item]
            if len(m) >= k:
                picks.append(m[torch.randperm(len(m), generator=generator)[:k]])
            else:
                extra = m[torch.randint(len(m), (k - len(m),), generator=generator)]
                picks.append(torch.cat([m, extra]))
        batches.append(torch.cat(picks))
    return batches


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches of ``batch_size`` images (the last partial batch dropped)."""
    perm = torch.randperm(n, generator=generator)
    size = min(batch_size, n)
    return [perm[i : i + size] for i in range(0, n - size + 1, size)]


# --- model parts ----------------------------------------------------------------------------------


def extractor_head_dims(head: nn.Module) -> list[int]:
    """The widths of a head built by :func:`imgsearch.models.backbones.projection_head`."""
    return [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]


def _split_head(extractor: Extractor) -> tuple[Extractor, nn.Module | None]:
    """``(extractor without its head, a copy of the head)``; ``(extractor, None)`` without one."""
    if extractor.head is None:
        return extractor, None
    linears = [m for m in extractor.head.modules() if isinstance(m, nn.Linear)]
    spec = dataclasses.replace(extractor.spec, head=(), embedding_dim=linears[0].in_features)
    return Extractor(extractor.body, spec), copy.deepcopy(extractor.head)


def attach_head(model: Extractor, head: nn.Module, dims: Sequence[int]) -> Extractor:
    """``model`` followed by the trained ``head`` (built by :func:`projection_head` with ``dims``):
    an extractor whose spec records the head, so :func:`imgsearch.models.backbones.load_extractor`
    rebuilds it."""
    spec = dataclasses.replace(
        model.spec, embedding_dim=int(dims[-1]), head=tuple(int(d) for d in dims)
    )
    return Extractor(model.body, spec, head=head.eval()).eval()


def _epoch_bn_stats(head: nn.Module) -> None:
    """Make the head's BatchNorm running statistics the plain average over the coming epoch.

    With the default exponential average (momentum 0.1) an epoch of few steps leaves them near
    their initial (0, 1), and in eval mode the head then maps every input to about its last bias:
    a kept head would return collapsed embeddings after a short (for example incremental) run.
    Training itself uses batch statistics and is unaffected.
    """
    for module in head.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None


def backbone_blocks(extractor: Extractor) -> list[nn.Module]:
    """The backbone's blocks from input to output, for ``freeze_blocks``.

    torchvision MobileNetV2 / EfficientNet: ``features[i]``; ResNet: stem, layer1..layer4;
    efficientnet-pytorch: stem, each of ``_blocks``, head. Raises :class:`ConfigError` otherwise.
    """
    body = extractor.body

    def child(name: str) -> nn.Module | None:
        module = getattr(body, name, None)
        return module if isinstance(module, nn.Module) else None

    features = child("features")
    if isinstance(features, nn.Sequential):
        return list(features)
    resnet = [child(n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    if all(m is not None for m in resnet):
        parts = [m for m in resnet if m is not None]
        return [nn.ModuleList(parts[:2]), *parts[2:]]
    blocks = child("_blocks")
    if isinstance(blocks, nn.ModuleList):
        stem = nn.ModuleList([m for m in (child("_conv_stem"), child("_bn0")) if m is not None])
        head = nn.ModuleList([m for m in (child("_conv_head"), child("_bn1")) if m is not None])
        return [stem, *blocks, head]
    raise ConfigError(f"freeze_blocks: do not know the blocks of backbone {extractor.spec.name!r}")


def _freeze(extractor: Extractor, n_blocks: int) -> list[nn.Module]:
    """Freeze the first ``n_blocks`` blocks; return them (to be kept in eval mode)."""
    if n_blocks == 0:
        return []
    blocks = backbone_blocks(extractor)
    if n_blocks > len(blocks):
        raise ConfigError(
            f"freeze_blocks={n_blocks} but {extractor.spec.name} has {len(blocks)} blocks"
        )
    for block in blocks[:n_blocks]:
        block.requires_grad_(False)
    return blocks[:n_blocks]


def _set_train_mode(extractor: Extractor, frozen: Iterable[nn.Module], freeze_bn: bool) -> None:
    extractor.train()
    for block in frozen:
        block.eval()
    if freeze_bn:
        for module in extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D parameters), the usual practice."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- validation -----------------------------------------------------------------------------------


@torch.no_grad()
def _embed(
    encode: Callable[[torch.Tensor], torch.Tensor],
    head: nn.Module,
    data: torch.Tensor,
    batch_size: int,
    dim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``encode`` each batch of ``data`` (images or trunk outputs) -> (embeddings, head outputs)."""
    head.eval()
    embs, heads = [], []
    for start in range(0, len(data), batch_size):
        emb = encode(data[start : start + batch_size])
        embs.append(emb)
        heads.append(head(emb))
    if not embs:
        return np.zeros((0, dim), np.float32), np.zeros((0, 1), np.float32)
    return torch.cat(embs).numpy(), torch.cat(heads).float().numpy()


def _sample_queries(n: int, max_queries: int | None, seed: int) -> np.ndarray | None:
    if max_queries is None or max_queries >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


def retrieval_summary(
    emb: np.ndarray, labels: np.ndarray, max_queries: int | None = None, seed: int = 0
) -> dict[str, float]:
    """``map_at_r``, ``map`` (full ranking), ``recall_at_1`` (top-1 hit rate), ``embedding_std``.

    The protocol of :mod:`imgsearch.evaluate.retrieval`: each image queries all the others, relevant =
    same label, cosine similarity; queries without a relevant image are left out.
    """
    x = M.l2_normalise(emb)
    labels = np.asarray(labels).astype(str)
    out = {"map_at_r": float("nan"), "map": float("nan"), "recall_at_1": float("nan")}
    out["embedding_std"] = float(np.mean(np.std(x, axis=0))) if len(x) else float("nan")
    if len(x) < 2:
        return out
    parts, n_rel = [], []
    for _, _, rel, n in rank_relevance(x, labels, _sample_queries(len(x), max_queries, seed)):
        parts.append(M.per_query_metrics(rel, n, ks=(1,)))
        n_rel.append(n)
    per_query = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    agg = M.aggregate(per_query, np.concatenate(n_rel))
    out.update(map_at_r=agg["map_at_r"], map=agg["map"], recall_at_1=agg["hit_at_1"])
    return out


# --- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, fsync, then ``os.replace``: a crash
    leaves the previous checkpoint or the new one, never half a file."""
    with atomic_writer(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises :class:`CheckpointError` for anything else (a pickle that would run code on load, a
    truncated file, a file that is not one of our checkpoints).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError for a forbidden global, RuntimeError for a bad zip
        raise CheckpointError(
            f"refusing checkpoint {path}: not loadable with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an imgsearch fine-tuning checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return state


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- training -------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything that trains, in one place (and what a checkpoint holds)."""

    model: Extractor
    head: nn.Module
    key_model: Extractor | None
    key_head: nn.Module | None
    moco: MoCo | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    frozen: list[nn.Module]


def _prepare_model(
    extractor: Extractor, cfg: FinetuneConfig, size: int
) -> tuple[Extractor, list[nn.Module]]:
    """A trainable copy of ``extractor`` with its spec updated; returns it and its frozen blocks."""
    model = copy.deepcopy(extractor)
    model.requires_grad_(True)
    spec = extractor.spec
    model.spec = dataclasses.replace(
        spec,
        weights=f"{spec.weights}+{cfg.method}",
        preprocess=dataclasses.replace(spec.preprocess, size=size),
    )
    return model, _freeze(model, cfg.blocks_to_freeze(spec.name))


class _Top(nn.Module):
    """The blocks after the frozen trunk, then what :class:`Extractor` does after its body:
    global average pooling and L2 normalisation. Shares its blocks with the model it came from."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x)
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return torch.nn.functional.normalize(pooled.float(), dim=1)


def split_at(model: Extractor, k: int) -> tuple[nn.Sequential, _Top]:
    """``(trunk, top)``: blocks ``[:k]`` and the rest, with ``top(trunk(x)) == model(x)``.

    Works for bodies that are ``features`` then global average pooling (torchvision's
    MobileNetV2); checked on a probe input, :class:`ConfigError` otherwise.
    """
    body_features = getattr(model.body, "features", None)
    blocks = backbone_blocks(model)
    if not isinstance(body_features, nn.Sequential) or not 0 < k < len(blocks):
        raise ConfigError(
            f"caching frozen blocks needs a backbone with a `features` sequence and 0 < k < its "
            f"length; {model.spec.name!r} with freeze_blocks={k} does not qualify"
        )
    trunk, top = nn.Sequential(*blocks[:k]), _Top(blocks[k:])
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
) -> tuple[torch.Tensor, np.ndarray, pd.DataFrame]:
    """Images of ``rows`` through the frozen ``trunk``, a batch at a time (images are not kept).

    Returns ``(outputs (N_ok, C, h, w) in dtype, ok mask (N,), failures)`` like :func:`load_images`.
    """
    trunk.eval()
    normalise = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    )
    outs, oks, fails = [], [], []
    for start in range(0, len(rows), batch_size):
        images, ok, failures = load_images(rows.iloc[start : start + batch_size], cfg)
        oks.append(ok)
        fails.append(failures)
        if len(images):
            x = normalise(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(trunk(x).to(dtype).contiguous())
    ok_all = np.concatenate(oks) if oks else np.zeros(0, dtype=bool)
    failures_all = pd.concat(fails, ignore_index=True) if fails else schema.empty_quarantine()
    if not outs:
        return torch.zeros((0, 1, 1, 1), dtype=dtype), ok_all, failures_all
    return torch.cat(outs), ok_all, failures_all


def _build_run(
    model: Extractor,
    frozen: list[nn.Module],
    cfg: FinetuneConfig,
    steps_per_epoch: int,
    start_head: nn.Module | None = None,
) -> _Run:
    dim = model.spec.embedding_dim
    head = projection_head(dim, cfg.head_dims) if cfg.head_dims else nn.Identity()
    if start_head is not None:
        head.load_state_dict(start_head.state_dict())
    key_model = key_head = moco = None
    if cfg.method == "moco":
        key_model = copy.deepcopy(model).requires_grad_(False).eval()
        key_head = copy.deepcopy(head).requires_grad_(False)
        out_dim = cfg.head_dims[-1] if cfg.head_dims else dim
        moco = MoCo(out_dim, cfg.moco_queue_size, cfg.moco_momentum, cfg.temperature, seed=cfg.seed)
    groups = _param_groups([model, head], cfg.weight_decay)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(warmup, cfg.epochs * steps_per_epoch)
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    return _Run(model, head, key_model, key_head, moco, optimizer, scheduler, generator, frozen)


def _train_epoch(
    run: _Run,
    cfg: FinetuneConfig,
    n_images: int,
    codes: np.ndarray,
    encode: Callable[[torch.Tensor], torch.Tensor],
    key_encode: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[float, int]:
    """One pass over the train split; returns (mean loss, views processed).

    ``encode(idx)`` embeds (a fresh view of) train images ``idx`` with the trained model;
    ``key_encode(idx)`` with MoCo's key encoder.
    """
    if cfg.method == "supcon":
        batches = pk_batches(
            codes, cfg.batch_size // cfg.images_per_item, cfg.images_per_item, run.generator
        )
    else:
        batches = random_batches(n_images, cfg.batch_size, run.generator)
    labels_all = torch.from_numpy(codes.astype(np.int64))
    _set_train_mode(run.model, run.frozen, cfg.freeze_bn)
    run.head.train()
    total, views = 0.0, 0
    for idx in batches:
        if cfg.method == "supcon":
            loss = supcon_loss(run.head(encode(idx)), labels_all[idx], cfg.temperature)
            views += len(idx)
        elif cfg.method == "simclr":
            z = run.head(encode(torch.cat([idx, idx])))
            loss = nt_xent_loss(z[: len(idx)], z[len(idx) :], cfg.temperature)
            views += 2 * len(idx)
        else:
            assert run.moco is not None and run.key_head is not None and key_encode is not None
            q = run.head(encode(idx))
            with torch.no_grad():
                run.key_head.eval()
                keys = run.key_head(key_encode(idx))
            loss = run.moco(q, keys)
            views += 2 * len(idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ImgsearchError(
                f"fine-tuning diverged: loss {value} (lower lr or raise temperature)"
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        if run.moco is not None:
            assert run.key_model is not None and run.key_head is not None
            run.moco.enqueue(keys)
            run.moco.momentum_update(run.model, run.key_model)
            run.moco.momentum_update(run.head, run.key_head)
        total += value
    return total / max(1, len(batches)), views


def _checkpoint_state(
    run: _Run,
    cfg: FinetuneConfig,
    start_fp: str,
    epoch: int,
    best: dict[str, Any],
    bad_epochs: int,
    history: list[dict[str, float]],
    elapsed_s: float,
    stop_reason: str,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "start_fingerprint": start_fp,
        "epoch": epoch,
        "model": _plain_state(run.model),
        "head": _plain_state(run.head),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "sampler": run.generator.get_state()},
        "best": best,
        "bad_epochs": bad_epochs,
        "history": history,
        "elapsed_s": elapsed_s,
        "stop_reason": stop_reason,
    }
    if run.moco is not None:
        assert run.key_model is not None and run.key_head is not None
        state["moco"] = _plain_state(run.moco)
        state["key_model"] = _plain_state(run.key_model)
        state["key_head"] = _plain_state(run.key_head)
    return state


def _restore(run: _Run, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.head.load_state_dict(state["head"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    run.generator.set_state(state["rng"]["sampler"])
    if run.moco is not None:
        assert run.key_model is not None and run.key_head is not None
        run.moco.load_state_dict(state["moco"])
        run.key_model.load_state_dict(state["key_model"])
        run.key_head.load_state_dict(state["key_head"])


def _check_resumable(state: dict[str, Any], cfg: FinetuneConfig, start_fp: str, path: Path) -> None:
    saved, now = dict(state["config"]), cfg.to_dict()
    for name in _RESUMABLE_FIELDS:
        saved.pop(name, None)
        now.pop(name, None)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"checkpoint {path} was made with another config (differs in {differ}); "
            "use another checkpoint_dir or remove the checkpoint to start over"
        )
    if state["start_fingerprint"] != start_fp:
        raise CheckpointError(f"checkpoint {path} was made from another starting extractor")


def _split_rows(manifest: pd.DataFrame, name: str) -> pd.DataFrame:
    return manifest[manifest[schema.SPLIT].astype(str) == name].reset_index(drop=True)


def finetune(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``extractor`` on the ``train`` rows of ``manifest``, early-stopped on ``val``.

    ``manifest`` needs ``image_id``, ``item_id``, ``split`` and ``path`` (or ``pre_path``).
    ``extractor`` is not modified. ``on_epoch(epoch, row)`` is called after epoch 0 (before
    training) and after each epoch, once its checkpoint is written (an exception raised there
    stops the run, which resumes from that checkpoint).

    Raises :class:`ConfigError` (bad config; missing columns; fewer than 2 train items; a
    checkpoint made with another config), :class:`CheckpointError` (a checkpoint that is not
    plain data or comes from another starting extractor), :class:`ImgsearchError` when the loss
    diverges.
    """
    wall_start = time.perf_counter()
    missing = [
        c for c in (schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT) if c not in manifest.columns
    ]
    if missing:
        raise ConfigError(f"finetune: manifest lacks columns {missing}")
    if schema.PATH not in manifest.columns and schema.PRE_PATH not in manifest.columns:
        raise ConfigError("finetune: manifest has neither 'path' nor 'pre_path'")

    start_fp = fingerprint(extractor)
    # A starting extractor with a head (an earlier keep_head run, e.g. the champion an incremental
    # run warm-starts from): the head is the projection head, trained on; the body trains as usual.
    extractor, start_head = _split_head(extractor)
    if start_head is not None:
        cfg = dataclasses.replace(cfg, head_dims=tuple(extractor_head_dims(start_head)))
    keep_head = cfg.keep_head and bool(cfg.head_dims)
    # the embedding the run starts from (epoch 0): through the head when the extractor had one
    head_at_start = keep_head and start_head is not None
    size = cfg.train_size or extractor.spec.preprocess.size
    pre_cfg = dataclasses.replace(extractor.spec.preprocess, size=size)
    train_rows, val_rows = _split_rows(manifest, "train"), _split_rows(manifest, "val")
    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE if cfg.checkpoint_dir else None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    mean, std = pre_cfg.mean, pre_cfg.std
    normalise = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(cfg.seed)
        model, frozen = _prepare_model(extractor, cfg, size)

        # Inputs: uint8 images (augmented at every step), or the frozen trunk's outputs.
        load_start = time.perf_counter()
        top: _Top | None = None
        n_frozen = cfg.blocks_to_freeze(extractor.spec.name)
        if cfg.caches_trunk(extractor.spec.name):
            try:
                trunk, top = split_at(model, n_frozen)
            except ConfigError as err:  # train as usual, only slower: every step runs every block
                log.warning("finetune: frozen blocks not cached: %s", err)
        if top is not None:
            dtype = CACHE_DTYPES[cfg.cache_dtype]
            args = (trunk, cfg.eval_batch_size, dtype, cfg.channels_last)
            train_x, train_ok, train_fail = trunk_outputs(train_rows, pre_cfg, *args)
            val_x, val_ok, val_fail = trunk_outputs(val_rows, pre_cfg, *args)
        else:
            train_x, train_ok, train_fail = load_images(train_rows, pre_cfg)
            val_x, val_ok, val_fail = load_images(val_rows, pre_cfg)
        load_s = time.perf_counter() - load_start
        codes = pd.factorize(train_rows.loc[train_ok, schema.ITEM_ID].astype(str))[0]
        val_labels = val_rows.loc[val_ok, schema.ITEM_ID].astype(str).to_numpy()
        n_items = int(codes.max()) + 1 if len(codes) else 0
        if n_items < 2:
            raise ConfigError(
                f"finetune needs at least 2 train items with readable images, got {n_items}"
            )
        n_train = len(train_x)
        if cfg.method == "supcon":
            steps_per_epoch = max(1, n_items // min(n_items, cfg.batch_size // cfg.images_per_item))
        else:
            steps_per_epoch = max(1, n_train // min(cfg.batch_size, n_train))
        log.info(
            "finetune %s: %d train images of %d items, %d val images, %d px, %s, "
            "%d steps/epoch (inputs ready in %.1fs)",
            cfg.method,
            n_train,
            n_items,
            len(val_x),
            size,
            f"blocks [:{n_frozen}] cached"
            if top is not None
            else ("augmented" if cfg.augment is not False else "not augmented"),
            steps_per_epoch,
            load_s,
        )
        run = _build_run(model, frozen, cfg, steps_per_epoch, start_head)

        aug = cfg.augment_config()
        transform = train_transform(aug, size, mean, std) if aug is not None else normalise

        def pixels(idx: torch.Tensor) -> torch.Tensor:
            if aug is None:
                return normalise(train_x[idx]).contiguous(memory_format=memory_format)
            return augment_batch(train_x[idx], transform).contiguous(memory_format=memory_format)

        def encode(idx: torch.Tensor) -> torch.Tensor:
            if top is not None:
                return top(train_x[idx].float().contiguous(memory_format=memory_format))
            return run.model(pixels(idx))

        def key_encode(idx: torch.Tensor) -> torch.Tensor:
            assert run.key_model is not None
            return run.key_model(pixels(idx))

        def encode_val(batch: torch.Tensor) -> torch.Tensor:
            run.model.eval()
            if top is not None:
                return top(batch.float().contiguous(memory_format=memory_format))
            return run.model(normalise(batch).contiguous(memory_format=memory_format))

        history: list[dict[str, float]] = []
        best: dict[str, Any] = {"epoch": -1, "metric": float("-inf"), "state": {}, "head": {}}
        bad_epochs, first_epoch, elapsed_before, stop_reason = 0, 1, 0.0, ""

        def evaluate_epoch(epoch: int, loss: float, views: int, train_s: float) -> dict[str, float]:
            emb, head_emb = _embed(
                encode_val, run.head, val_x, cfg.eval_batch_size, model.spec.embedding_dim
            )
            backbone = retrieval_summary(emb, val_labels, cfg.val_max_queries, cfg.seed)
            head = (
                retrieval_summary(head_emb, val_labels, cfg.val_max_queries, cfg.seed)
                if cfg.head_dims
                else backbone
            )
            # val_* describe the embedding the returned extractor would produce at this epoch
            # (epoch 0: the starting extractor, without a head).
            chosen = head if keep_head and (epoch > 0 or head_at_start) else backbone
            return {
                "epoch": float(epoch),
                "loss": loss,
                "lr": float(run.optimizer.param_groups[0]["lr"]),
                "val_map_at_r": chosen["map_at_r"],
                "val_map": chosen["map"],
                "val_recall_at_1": chosen["recall_at_1"],
                "val_embedding_std": chosen["embedding_std"],
                "val_map_at_r_backbone": backbone["map_at_r"],
                "val_map_at_r_head": head["map_at_r"],
                "images_per_s": views / train_s if train_s > 0 else float("nan"),
                "epoch_seconds": train_s,
            }

        def consider(row: dict[str, float], epoch: int) -> bool:
            """Record the epoch as best when it improves; True when it did."""
            metric = row["val_map_at_r"]
            if not math.isfinite(metric):  # no val queries: the last epoch is the best
                metric = float(epoch)
            if epoch > 0 and row["val_embedding_std"] < cfg.min_embedding_std:
                log.warning(
                    "finetune epoch %d: val embeddings collapsed (std %.2e < %.0e): not kept",
                    epoch,
                    row["val_embedding_std"],
                    cfg.min_embedding_std,
                )
                return False
            if metric > best["metric"] + (cfg.min_delta if best["epoch"] >= 0 else 0.0):
                best.update(
                    epoch=epoch,
                    metric=metric,
                    state=_plain_state(run.model),
                    head=(
                        _plain_state(run.head) if keep_head and (epoch > 0 or head_at_start) else {}
                    ),
                )
                return True
            return False

        state = None
        if ckpt_path is not None and ckpt_path.exists():
            state = load_checkpoint(ckpt_path)
            _check_resumable(state, cfg, start_fp, ckpt_path)
            _restore(run, state)
            history = list(state["history"])
            best = dict(state["best"])
            bad_epochs = int(state["bad_epochs"])
            first_epoch = int(state["epoch"]) + 1
            elapsed_before = float(state["elapsed_s"])
            stop_reason = str(state["stop_reason"])
            log.info("finetune: resuming from %s after epoch %d", ckpt_path, first_epoch - 1)
        else:
            row = evaluate_epoch(0, float("nan"), 0, 0.0)
            consider(row, 0)
            history.append(row)
            log.info("finetune epoch 0 (before training): val MAP@R %.4f", row["val_map_at_r"])
            if on_epoch is not None:
                on_epoch(0, dict(row))

        budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes is not None else math.inf
        last_epoch_s = 0.0
        epoch = first_epoch
        while not stop_reason and epoch <= cfg.epochs:
            elapsed = elapsed_before + (time.perf_counter() - wall_start)
            if elapsed + last_epoch_s > budget_s:
                stop_reason = "time_budget"
                log.info(
                    "finetune: stopping before epoch %d (time budget %.1f min)",
                    epoch,
                    cfg.max_minutes,
                )
                break
            t0 = time.perf_counter()
            _epoch_bn_stats(run.head)
            loss, views = _train_epoch(
                run, cfg, n_train, codes, encode, key_encode if run.moco is not None else None
            )
            train_s = time.perf_counter() - t0
            row = evaluate_epoch(epoch, loss, views, train_s)
            last_epoch_s = time.perf_counter() - t0
            if consider(row, epoch):
                bad_epochs = 0
            else:
                bad_epochs += 1
            history.append(row)
            log.info(
                "finetune epoch %d: loss %.4f, val MAP@R %.4f (head %.4f), std %.4f, %.1f img/s, %.0fs",
                epoch,
                loss,
                row["val_map_at_r"],
                row["val_map_at_r_head"],
                row["val_embedding_std"],
                row["images_per_s"],
                last_epoch_s,
            )
            if bad_epochs >= cfg.patience > 0 and math.isfinite(row["val_map_at_r"]):
                stop_reason = "early_stopping"
            elif epoch == cfg.epochs:
                stop_reason = "epochs"
            if ckpt_path is not None:
                elapsed = elapsed_before + (time.perf_counter() - wall_start)
                save_checkpoint(
                    _checkpoint_state(
                        run, cfg, start_fp, epoch, best, bad_epochs, history, elapsed, stop_reason
                    ),
                    ckpt_path,
                )
            if on_epoch is not None:
                on_epoch(epoch, dict(row))
            epoch += 1
        if not stop_reason:
            stop_reason = "epochs"

    model = run.model
    model.load_state_dict(best["state"])
    model.requires_grad_(True)
    model.eval()
    if best["head"]:
        run.head.load_state_dict(best["head"])
        model = attach_head(model, run.head, cfg.head_dims)
    frame = pd.DataFrame(history)
    trained = frame[frame["epoch"] > 0]
    initial = (
        float(frame.loc[frame["epoch"] == 0, "val_map_at_r"].iloc[0])
        if (frame["epoch"] == 0).any()
        else float("nan")
    )
    best_row = frame.loc[frame["epoch"] == best["epoch"]]
    metrics: dict[str, float] = {
        "best_epoch": float(best["epoch"]),
        "best_val_map_at_r": float(best_row["val_map_at_r"].iloc[0])
        if len(best_row)
        else float("nan"),
        "best_val_map": float(best_row["val_map"].iloc[0]) if len(best_row) else float("nan"),
        "best_val_recall_at_1": float(best_row["val_recall_at_1"].iloc[0])
        if len(best_row)
        else float("nan"),
        "initial_val_map_at_r": initial,
        "epochs_run": float(len(trained)),
        "early_stopped": float(stop_reason == "early_stopping"),
        "time_budget_hit": float(stop_reason == "time_budget"),
        "train_images_per_s": float(trained["images_per_s"].mean())
        if len(trained)
        else float("nan"),
        "wall_seconds": time.perf_counter() - wall_start,
        "n_train_images": float(n_train),
        "n_train_items": float(n_items),
        "n_val_images": float(len(val_x)),
        "n_unreadable": float(len(train_fail) + len(val_fail)),
        "train_size": float(size),
    }
    failures = (
        pd.concat([train_fail, val_fail], ignore_index=True)
        if len(train_fail) or len(val_fail)
        else schema.empty_quarantine()
    )
    return FinetuneResult(model, frame, metrics, stop_reason, failures)
