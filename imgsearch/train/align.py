"""Align a text tower to the locked image embeddings (LiT, Zhai et al. 2022).

The image side never changes: the embeddings of the champion extractor (and so the index) stay
as they are. A small :class:`~imgsearch.models.heads.Projection` maps frozen text-tower features
into the image embedding space, trained with CLIP's symmetric contrastive loss (InfoNCE text ->
image and image -> text, learnable temperature, :func:`~imgsearch.train.losses.clip.clip_loss`).

Pairs are made at item level: each step takes a batch of distinct training items and, for each,
one of its texts (any kind, any language) and one of its images (``image_target="image"``) or the
mean of its images' embeddings (``"prototype"``); the other items of the batch are the negatives.
Only ``train`` items are used to fit (the text tower too, when it learns from the catalog: the
character n-gram tower); ``val`` label queries against the ``val`` images pick the epoch
(early stopping on text -> image MAP@R, :mod:`imgsearch.evaluate.cross_modal`); ``test`` is never
touched here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate.cross_modal import cross_modal_scores
from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.models.heads import HeadSpec, Projection
from imgsearch.train.config import StoppingConfig
from imgsearch.train.loop import EarlyStopping
from imgsearch.train.losses.clip import clip_loss

log = logging.getLogger(__name__)

LANG, KIND, TEXT = "lang", "kind", "text"
TEXT_COLUMNS = (schema.ITEM_ID, LANG, KIND, TEXT)
IMAGE_TARGETS = ("image", "prototype")
BATCH_BY = ("item", "text")


class TextFeatures(Protocol):
    """What alignment needs of a text tower: frozen features for a list of texts."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class AlignConfig:
    head: str = "linear"  # linear | mlp
    hidden: int = 512
    dropout: float = 0.1
    epochs: int = 200
    batch_items: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07  # initial; learnable (CLIP's logit scale, clamped at 100)
    image_target: str = "image"  # image | prototype
    batch_by: str = "item"  # item: one text per item per epoch | text: every text every epoch
    patience: int = 20  # epochs without a better val MAP@R before stopping
    val_kinds: Sequence[str] = ("label",)  # texts used as val queries (all kinds when none match)
    seed: int = 0

    def __post_init__(self) -> None:
        HeadSpec(self.head, 1, 1, self.hidden, self.dropout)  # validates head/hidden/dropout
        if self.image_target not in IMAGE_TARGETS:
            raise ConfigError(f"align.image_target must be one of {IMAGE_TARGETS}")
        if self.batch_by not in BATCH_BY:
            raise ConfigError(f"align.batch_by must be one of {BATCH_BY}")
        for name in ("epochs", "batch_items", "patience"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"align.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_items < 2:
            raise ConfigError("align.batch_items must be >= 2 (the other items are the negatives)")
        if not (self.lr > 0 and self.temperature > 0 and self.weight_decay >= 0):
            raise ConfigError("align.lr and align.temperature must be > 0, weight_decay >= 0")
        self.val_kinds = tuple(self.val_kinds)


@dataclass
class AlignResult:
    head: Projection
    best_epoch: int
    val_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    n_train_items: int = 0
    n_train_texts: int = 0


@dataclass
class _Side:
    """The texts and image embeddings of one split, grouped by item."""

    items: np.ndarray  # (I,) item ids with at least one text and one image
    text_feats: np.ndarray  # (T, F) frozen text features
    text_items: np.ndarray  # (T,) index into items
    text_kinds: np.ndarray  # (T,)
    img_emb: np.ndarray  # (M, D) image embeddings of those items
    img_items: np.ndarray  # (M,) index into items


def check_texts(texts: pd.DataFrame) -> pd.DataFrame:
    """The text table with its four columns as str, or a :class:`ConfigError` naming what is missing."""
    missing = [c for c in TEXT_COLUMNS if c not in texts.columns]
    if missing:
        raise ConfigError(f"the texts table lacks columns {missing} (needs {list(TEXT_COLUMNS)})")
    return texts[list(TEXT_COLUMNS)].astype(str)


def _side(texts: pd.DataFrame, images: pd.DataFrame, emb: np.ndarray, tower: TextFeatures) -> _Side:
    both = sorted(set(texts[schema.ITEM_ID]) & set(images[schema.ITEM_ID]))
    pos = {item: i for i, item in enumerate(both)}
    t = texts[texts[schema.ITEM_ID].isin(pos)]
    keep = images[schema.ITEM_ID].isin(pos).to_numpy()
    feats = tower.encode(t[TEXT].tolist()) if len(t) else np.zeros((0, 1), np.float32)
    return _Side(
        items=np.asarray(both, dtype=object),
        text_feats=np.asarray(feats, dtype=np.float32),
        text_items=t[schema.ITEM_ID].map(pos).to_numpy(dtype=np.int64),
        text_kinds=t[KIND].to_numpy(),
        img_emb=l2_normalise(np.asarray(emb, dtype=np.float32)[keep]),
        img_items=images.loc[keep, schema.ITEM_ID].map(pos).to_numpy(dtype=np.int64),
    )


class _Groups:
    """The rows of each item (``index``: item code per row), as one sorted array and bounds."""

    def __init__(self, index: np.ndarray, n: int) -> None:
        self.order = np.argsort(index, kind="stable")
        self.bounds = np.searchsorted(index[self.order], np.arange(n + 1))

    def __getitem__(self, item: int) -> np.ndarray:
        return self.order[self.bounds[item] : self.bounds[item + 1]]

    def draw(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn row of each of ``items`` (every item has at least one row)."""
        start = self.bounds[items]
        return self.order[start + rng.integers(0, self.bounds[items + 1] - start)]


class _Batches:
    """Seeded batches: by item (one text per item) or by text (every text, multi-positive)."""

    def __init__(self, side: _Side, cfg: AlignConfig) -> None:
        n = len(side.items)
        self.side, self.cfg = side, cfg
        self.texts_of = _Groups(side.text_items, n)
        self.images_of = _Groups(side.img_items, n)
        proto = np.stack([side.img_emb[self.images_of[i]].mean(axis=0) for i in range(n)])
        self.prototypes = torch.from_numpy(l2_normalise(proto.astype(np.float32)))
        self.feats = torch.from_numpy(side.text_feats)
        self.images = torch.from_numpy(side.img_emb)
        self.rng = np.random.default_rng(cfg.seed)

    def epoch(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(text features, image targets, item index of each pair) per batch."""
        if self.cfg.batch_by == "text":
            return self._text_batches()
        n, size = len(self.side.items), self.cfg.batch_items
        order = self.rng.permutation(n)
        out = []
        for start in range(0, n - 1, size):
            batch = order[start : start + size]
            if len(batch) < 2:
                continue
            t = self.texts_of.draw(batch, self.rng)
            out.append(self._pairs(torch.from_numpy(t), batch))
        return out

    def _text_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every training text once per epoch; texts of one item in a batch are all positives of
        each other's images (the multi-positive loss), so no pair is a false negative."""
        order = self.rng.permutation(len(self.side.text_items))
        size, out = self.cfg.batch_items, []
        for start in range(0, len(order), size):
            t = order[start : start + size]
            items = self.side.text_items[t]
            if len(np.unique(items)) < 2:
                continue
            out.append(self._pairs(torch.from_numpy(t), items))
        return out

    def _pairs(
        self, t: torch.Tensor, items: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cfg.image_target == "prototype":
            img = self.prototypes[torch.from_numpy(items)]
        else:
            img = self.images[torch.from_numpy(self.images_of.draw(items, self.rng))]
        return self.feats[t], img, torch.from_numpy(np.asarray(items, dtype=np.int64))


def _val_queries(side: _Side, kinds: Sequence[str]) -> np.ndarray:
    chosen = np.isin(side.text_kinds, list(kinds))
    return chosen if chosen.any() else np.ones(len(side.text_kinds), dtype=bool)


def project(head: Projection, feats: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Frozen text features -> unit vectors in the image space (no gradients, eval mode)."""
    head.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(feats), batch):
            x = torch.from_numpy(np.asarray(feats[start : start + batch], dtype=np.float32))
            out.append(head(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.spec.d_out), np.float32)


def _val_scores(head: Projection, val: _Side, kinds: Sequence[str]) -> dict[str, float]:
    chosen = _val_queries(val, kinds)
    q = project(head, val.text_feats[chosen])
    metrics, _ = cross_modal_scores(
        q, val.text_items[chosen], val.img_emb, val.img_items, ks=(1, 10)
    )
    return metrics


def _train_epoch(
    head: Projection, scale: torch.nn.Parameter, opt: torch.optim.Optimizer, batches: _Batches
) -> float:
    head.train()
    losses = []
    for feats, images, ids in batches.epoch():
        loss = clip_loss(images, head(feats), ids, ids, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            scale.clamp_(0.0, float(np.log(100.0)))
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def align(
    texts: pd.DataFrame,
    images: pd.DataFrame,
    emb: np.ndarray,
    tower: TextFeatures,
    cfg: AlignConfig,
) -> AlignResult:
    """Train the projection on ``train`` rows of ``images`` (with a ``split`` column); see the module doc.

    ``texts``: item_id, lang, kind, text (already filtered: restricted items removed by the caller);
    ``images``: image_id, item_id, split, one row per row of ``emb``. A tower with a ``fit``
    method (learned from the catalog) is fitted on the training texts first.
    """
    texts = check_texts(texts)
    images = images.assign(**{schema.ITEM_ID: images[schema.ITEM_ID].astype(str)})
    emb = np.asarray(emb)
    if len(emb) != len(images):
        raise ConfigError(f"{len(emb)} embeddings for {len(images)} image rows")
    by_split = {s: (images[schema.SPLIT] == s).to_numpy() for s in ("train", "val")}
    train_texts = texts[texts[schema.ITEM_ID].isin(images.loc[by_split["train"], schema.ITEM_ID])]
    if hasattr(tower, "fit"):
        tower.fit(train_texts[TEXT].tolist())
    sides = {
        s: _side(texts, images[mask].reset_index(drop=True), emb[mask], tower)
        for s, mask in by_split.items()
    }
    train, val = sides["train"], sides["val"]
    if len(train.items) < 2:
        raise ConfigError(
            f"alignment needs >= 2 training items with both a text and an image, found {len(train.items)}"
        )
    if len(val.items) == 0:
        raise ConfigError("alignment needs validation items with both a text and an image")
    return _fit(train, val, cfg)


def _fit(train: _Side, val: _Side, cfg: AlignConfig) -> AlignResult:
    torch.manual_seed(cfg.seed)
    spec = HeadSpec(
        cfg.head, train.text_feats.shape[1], train.img_emb.shape[1], cfg.hidden, cfg.dropout
    )
    head = Projection(spec)
    scale = torch.nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.temperature))))
    opt = torch.optim.AdamW([*head.parameters(), scale], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _Batches(train, cfg)
    stopping = EarlyStopping(StoppingConfig(patience=cfg.patience, min_embedding_std=0.0))
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        loss = _train_epoch(head, scale, opt, batches)
        metrics = _val_scores(head, val, cfg.val_kinds)
        row = {
            "epoch": epoch,
            "loss": loss,
            "val_map_at_r": metrics["map_at_r"],
            "val_hit_at_10": metrics["hit_at_10"],
            "temperature": float(1.0 / scale.detach().exp()),
        }
        history.append(row)
        if stopping.observe(epoch, {**row, "val_embedding_std": 1.0}, head, None):
            best_metrics = metrics
        elif stopping.should_stop(row):
            log.info("align: early stop at epoch %d (best %d)", epoch, stopping.best_epoch)
            break
    head.load_state_dict(stopping.best_state)
    head.eval()
    return AlignResult(
        head=head,
        best_epoch=int(stopping.best_epoch),
        val_metrics={f"val_{k}": float(v) for k, v in best_metrics.items()},
        history=history,
        n_train_items=len(train.items),
        n_train_texts=len(train.text_items),
    )
