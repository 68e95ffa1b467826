"""Fine-tuning settings: one small config per component, and the flat :class:`FinetuneConfig`.

Users write one flat ``finetune:`` section (``configs/finetune.yaml``, ``--finetune.lr``, the
improve job's overrides), so :class:`FinetuneConfig` keeps those names as its fields. Each
component of the training reads its own slice through a property, built (and validated) by its
own small dataclass:

- :class:`ObjectiveConfig` (``objective``): the method, its temperature, batch composition, MoCo's
  queue and momentum, pixel augmentation, the attribute cross-entropy terms (multi-task).
- :class:`HeadConfig` (``head``): the projection head's widths and whether the extractor keeps it.
- :class:`OptimConfig` (``optim``): optimizer, learning rate, weight decay.
- :class:`ScheduleConfig` (``schedule``): epochs, warm-up, time budget.
- :class:`FreezeConfig` (``freezing``): frozen blocks, frozen BatchNorm, the frozen-trunk cache.
- :class:`StoppingConfig` (``stopping``): early stopping on validation retrieval.
- :class:`InputConfig` (``inputs``): resolution, evaluation batch size, memory format.

``seed`` and ``checkpoint_dir`` are single values and stay on :class:`FinetuneConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from imgsearch.errors import ConfigError
from imgsearch.train.augment import AugmentConfig, as_augment_config

METHODS = ("supcon", "simclr", "moco")
OPTIMIZERS = ("adamw", "sgd")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TRAIN_DTYPES = ("float32", "bfloat16")


# --- checks shared by the components ----------------------------------------------------------------


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` when it is an int (not a bool) >= ``low``, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"finetune.{name} must be an int >= {low}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, low: int) -> int | None:
    return None if value is None else check_int(name, value, low)


def check_positive(name: str, value: Any) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"finetune.{name} must be > 0, got {number}")
    return number


def check_non_negative(name: str, value: Any) -> float:
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"finetune.{name} must be >= 0, got {number}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"finetune.{name} must be one of {tuple(choices)}, got {value!r}")
    return str(value)


# --- the components ---------------------------------------------------------------------------------


@dataclass
class ObjectiveConfig:
    """What the loss sees. ``batch_size``: images per step (supcon: ``batch_size //
    images_per_item`` items of ``images_per_item`` images each, PK sampling). ``augment``:
    :class:`AugmentConfig` fields over the paper preset of ``method`` (``None`` = the preset),
    ``False`` = no pixel augmentation (supcon only: its positives are the item's other images).
    ``attribute_loss``: catalog column -> weight of a cross-entropy term on that attribute (supcon
    only; multi-task fine-tuning, :class:`imgsearch.train.objectives.SupCon`); ``{}`` = none."""

    method: str = "supcon"
    temperature: float = 0.1
    batch_size: int = 64
    images_per_item: int = 4
    moco_queue_size: int = 4096
    moco_momentum: float = 0.99
    augment: dict[str, Any] | bool | None = None
    attribute_loss: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = check_choice("method", self.method, METHODS)
        self.attribute_loss = _check_attribute_loss(self.attribute_loss, self.method)
        self.temperature = check_positive("temperature", self.temperature)
        check_int("batch_size", self.batch_size, 2)
        check_int("images_per_item", self.images_per_item, 1)
        check_int("moco_queue_size", self.moco_queue_size, 1)
        self.moco_momentum = float(self.moco_momentum)
        if not 0.0 <= self.moco_momentum < 1.0:
            raise ConfigError(f"finetune.moco_momentum must be in [0, 1), got {self.moco_momentum}")
        if self.method == "supcon" and self.batch_size // self.images_per_item < 2:
            raise ConfigError(
                "finetune: supcon needs at least 2 items per batch "
                f"(batch_size {self.batch_size} // images_per_item {self.images_per_item} < 2)"
            )
        self.augment = _check_augment(self.augment, self.method)

    def augment_config(self) -> AugmentConfig | None:
        """The augmentation recipe, or ``None`` when ``augment`` is false."""
        if self.augment is False:
            return None
        return as_augment_config(
            self.augment if isinstance(self.augment, dict) else None, self.method
        )


def _check_attribute_loss(weights: Any, method: str) -> dict[str, float]:
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise ConfigError(
            "finetune.attribute_loss must map catalog columns to loss weights, "
            f"got {type(weights).__name__}"
        )
    out = {str(k): check_positive(f"attribute_loss.{k}", v) for k, v in weights.items()}
    if out and method != "supcon":
        raise ConfigError(
            f"finetune.attribute_loss is a term of the supcon objective, not of {method}"
        )
    return out


def _check_augment(augment: Any, method: str) -> dict[str, Any] | bool | None:
    if augment is True:
        augment = None
    if augment is not None and not isinstance(augment, (dict, bool)):
        raise ConfigError(
            "finetune.augment must be a mapping of AugmentConfig fields, null or false"
        )
    if augment is False and method != "supcon":
        raise ConfigError(
            f"finetune.augment=false leaves {method} without positives: "
            "its two views come from augmentation (use method supcon)"
        )
    if augment is not False:  # validate the recipe now, not at the first epoch
        as_augment_config(augment if isinstance(augment, dict) else None, method)
    return augment


@dataclass
class HeadConfig:
    """``head_dims``: widths of the projection head (``[512, 128]`` = Linear(D, 512), BN, ReLU,
    Linear(512, 128)); ``()`` puts the loss on the backbone embedding. ``keep_head``: the
    returned extractor embeds through the trained head (and early stopping watches that).
    ``keep_backbone``: ``w`` in ``[0, 1)``; with ``w > 0`` the returned extractor keeps its pooled
    backbone embedding beside the kept head's output (``ExtractorSpec.backbone_weight``, cosine =
    ``w cos(backbone) + (1 - w) cos(head)``): it forgets less of what the backbone knew about
    images unlike the catalog's (issue 16, section 3). Training and early stopping are unchanged
    (they watch the head); the pipeline's evaluation measures the kept embedding."""

    head_dims: Sequence[int] = (512, 128)
    keep_head: bool = False
    keep_backbone: float = 0.0

    def __post_init__(self) -> None:
        self.head_dims = tuple(int(d) for d in self.head_dims)
        if any(d < 1 for d in self.head_dims):
            raise ConfigError(f"finetune.head_dims must be positive, got {self.head_dims}")
        w = self.keep_backbone
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w < 1.0:
            raise ConfigError(f"finetune.keep_backbone must be a number in [0, 1), got {w!r}")
        self.keep_backbone = float(w)
        if self.keep_backbone and not self.kept:
            raise ConfigError(
                "finetune.keep_backbone keeps the backbone embedding beside the head: it needs "
                "keep_head: true and head_dims"
            )

    @property
    def kept(self) -> bool:
        """True when the returned extractor embeds through the head (there is one to keep)."""
        return self.keep_head and bool(self.head_dims)


@dataclass
class OptimConfig:
    """``adamw`` | ``sgd`` (Nesterov momentum 0.9); no weight decay on biases and norm weights."""

    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.lr = check_positive("lr", self.lr)
        self.weight_decay = check_non_negative("weight_decay", self.weight_decay)


@dataclass
class ScheduleConfig:
    """``epochs``; a linear ``warmup_epochs`` then cosine decay to 0, stepped every batch;
    ``max_minutes``: no epoch starts that would overrun it (``None`` = no budget)."""

    epochs: int = 20
    warmup_epochs: float = 1.0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        self.warmup_epochs = check_non_negative("warmup_epochs", self.warmup_epochs)
        if self.max_minutes is not None:
            self.max_minutes = float(self.max_minutes)
            if not self.max_minutes > 0:
                raise ConfigError(
                    f"finetune.max_minutes must be > 0 or null, got {self.max_minutes}"
                )


@dataclass
class FreezeConfig:
    """``freeze_blocks``: the first k blocks stay fixed; an int, or backbone name -> k
    (``default`` for the others). ``freeze_bn``: BatchNorm statistics stay fixed.
    ``cache_frozen``/``cache_dtype``: without augmentation, the frozen blocks' outputs are
    computed once and kept in that dtype."""

    freeze_blocks: int | dict[str, int] = 0
    freeze_bn: bool = True
    cache_frozen: bool = True
    cache_dtype: str = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.freeze_blocks, Mapping):
            self.freeze_blocks = {str(k): v for k, v in self.freeze_blocks.items()}
            for key, k in self.freeze_blocks.items():
                if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                    raise ConfigError(
                        f"finetune.freeze_blocks.{key} must be an integer >= 0, got {k!r}"
                    )
        else:
            check_int("freeze_blocks", self.freeze_blocks, 0)
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"finetune.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )

    def blocks_to_freeze(self, backbone: str) -> int:
        """``freeze_blocks`` for ``backbone``: the integer, or the mapping's entry for that name
        (else its ``default``, else 0)."""
        if isinstance(self.freeze_blocks, Mapping):
            return int(self.freeze_blocks.get(backbone, self.freeze_blocks.get("default", 0)))
        return int(self.freeze_blocks)


@dataclass
class StoppingConfig:
    """Early stopping on ``val_map_at_r``: ``patience`` epochs without a ``min_delta``
    improvement (0 = never stop early). An epoch whose val embeddings collapsed (std below
    ``min_embedding_std``) is never kept. ``val_max_queries``: rank only this many seeded val
    queries (against all val images)."""

    patience: int = 5
    min_delta: float = 0.0
    min_embedding_std: float = 1e-4
    val_max_queries: int | None = None

    def __post_init__(self) -> None:
        check_int("patience", self.patience, 0)
        self.min_delta = check_non_negative("min_delta", self.min_delta)
        self.min_embedding_std = check_non_negative("min_embedding_std", self.min_embedding_std)
        check_optional_int("val_max_queries", self.val_max_queries, 1)


@dataclass
class InputConfig:
    """``train_size``: training (and then extraction) resolution, ``None`` = the extractor's;
    ``eval_batch_size``; ``channels_last``: NHWC convolutions (faster on CPU).
    ``train_dtype``: the compute dtype of the training steps' forward and backward passes
    (``bfloat16``: autocast, weights, optimizer, loss and validation stay float32; used only
    where the CPU computes bfloat16 natively, see :func:`imgsearch.train.precision.train_autocast`)."""

    train_size: int | None = None
    eval_batch_size: int = 128
    channels_last: bool = True
    train_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_optional_int("train_size", self.train_size, 8)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        if self.train_dtype not in TRAIN_DTYPES:
            raise ConfigError(
                f"finetune.train_dtype must be one of {list(TRAIN_DTYPES)}, got {self.train_dtype!r}"
            )


# --- the flat facade --------------------------------------------------------------------------------

Part = TypeVar("Part")


@dataclass
class FinetuneConfig:
    """How to fine-tune, with the flat names of ``configs/finetune.yaml``.

    Each field belongs to one component (see the module docstring and the component classes
    for what each means); ``seed`` and ``checkpoint_dir`` (``None`` = no checkpoints) are its
    own. The properties return a fresh, validated component built from the fields.
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
    keep_backbone: float = 0.0
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
    attribute_loss: dict[str, float] = dataclasses.field(default_factory=dict)
    cache_frozen: bool = True
    cache_dtype: str = "float16"
    seed: int = 0
    checkpoint_dir: str | None = None
    max_minutes: float | None = None
    eval_batch_size: int = 128
    channels_last: bool = True
    train_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        for part in (
            self.objective,
            self.head,
            self.optim,
            self.schedule,
            self.freezing,
            self.stopping,
            self.inputs,
        ):
            # the component validated its slice; keep its normalised values (floats, tuples)
            for f in dataclasses.fields(part):
                setattr(self, f.name, getattr(part, f.name))

    def _part(self, cls: type[Part]) -> Part:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        return cls(**{f.name: getattr(self, f.name) for f in fields})

    @property
    def objective(self) -> ObjectiveConfig:
        return self._part(ObjectiveConfig)

    @property
    def head(self) -> HeadConfig:
        return self._part(HeadConfig)

    @property
    def optim(self) -> OptimConfig:
        return self._part(OptimConfig)

    @property
    def schedule(self) -> ScheduleConfig:
        return self._part(ScheduleConfig)

    @property
    def freezing(self) -> FreezeConfig:
        return self._part(FreezeConfig)

    @property
    def stopping(self) -> StoppingConfig:
        return self._part(StoppingConfig)

    @property
    def inputs(self) -> InputConfig:
        return self._part(InputConfig)

    def augment_config(self) -> AugmentConfig | None:
        """The augmentation recipe, or ``None`` when ``augment`` is false."""
        return self.objective.augment_config()

    def blocks_to_freeze(self, backbone: str) -> int:
        """``freeze_blocks`` for ``backbone`` (see :meth:`FreezeConfig.blocks_to_freeze`)."""
        return self.freezing.blocks_to_freeze(backbone)

    def caches_trunk(self, backbone: str) -> bool:
        """True when the frozen blocks' outputs are computed once (no augmentation, frozen blocks)."""
        return self.augment is False and self.blocks_to_freeze(backbone) > 0 and self.cache_frozen

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): what a checkpoint stores and compares on resume."""
        out = dataclasses.asdict(self)
        out["head_dims"] = list(self.head_dims)
        aug = self.augment_config()
        out["augment"] = False if aug is None else aug.to_dict()
        if not out["attribute_loss"]:  # unset, a checkpoint's config reads as it did before it
            del out["attribute_loss"]
        if not out["keep_backbone"]:  # ditto
            del out["keep_backbone"]
        if out["train_dtype"] == "float32":  # ditto
            del out["train_dtype"]
        return out
