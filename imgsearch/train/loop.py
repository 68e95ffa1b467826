"""The training loop: one :class:`Run` (model, head, inputs, objective, optimizer), epochs of
steps, validation after each, :class:`EarlyStopping` keeping the best epoch, checkpoints.

:func:`finetune` (documented in :mod:`imgsearch.train.finetune`) is the composition.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from imgsearch import schema
from imgsearch.embed.trunk import TrunkStore
from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.models.backbones import Extractor, fingerprint
from imgsearch.train.checkpoint import (
    CHECKPOINT_FORMAT,
    check_resumable,
    checkpoint_path,
    load_checkpoint,
    plain_state,
    save_checkpoint,
)
from imgsearch.train.config import FinetuneConfig, StoppingConfig
from imgsearch.train.inputs import TrainInputs, describe, prepare_inputs
from imgsearch.train.objectives import Batch, Objective, Parts, make_objective
from imgsearch.train.parts import (
    attach_head,
    build_head,
    build_optimizer,
    epoch_bn_stats,
    extractor_head_dims,
    prepare_model,
    set_train_mode,
    split_head,
)
from imgsearch.train.result import FinetuneResult, summary
from imgsearch.train.validation import embed, val_scores

# The public entry's name: what callers (benchmarks, users) set levels on.
log = logging.getLogger("imgsearch.train.finetune")

OnEpoch = Callable[[int, dict[str, float]], None]


class EarlyStopping:
    """Keeps the best epoch by ``val_map_at_r`` (its model and head states) and counts the
    epochs since it. An epoch whose val embeddings collapsed is never kept; without val
    queries (NaN MAP@R) the latest epoch is the best."""

    def __init__(self, cfg: StoppingConfig) -> None:
        self.cfg = cfg
        self.best_epoch = -1
        self.best_metric = float("-inf")
        self.best_state: dict[str, torch.Tensor] = {}
        self.best_head: dict[str, torch.Tensor] = {}
        self.bad_epochs = 0

    def _improves(self, epoch: int, row: dict[str, float]) -> bool:
        metric = row["val_map_at_r"]
        if not math.isfinite(metric):  # no val queries: the last epoch is the best
            metric = float(epoch)
        if epoch > 0 and row["val_embedding_std"] < self.cfg.min_embedding_std:
            log.warning(
                "finetune epoch %d: val embeddings collapsed (std %.2e < %.0e): not kept",
                epoch,
                row["val_embedding_std"],
                self.cfg.min_embedding_std,
            )
            return False
        delta = self.cfg.min_delta if self.best_epoch >= 0 else 0.0
        if metric > self.best_metric + delta:
            self.best_epoch, self.best_metric = epoch, metric
            return True
        return False

    def observe(
        self, epoch: int, row: dict[str, float], model: nn.Module, head: nn.Module | None
    ) -> bool:
        """Record ``epoch`` (``head``: the head the returned extractor would keep, or None);
        True when it is the new best."""
        if self._improves(epoch, row):
            self.best_state = plain_state(model)
            self.best_head = plain_state(head) if head is not None else {}
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, row: dict[str, float]) -> bool:
        return self.bad_epochs >= self.cfg.patience > 0 and math.isfinite(row["val_map_at_r"])

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``best`` entry (``bad_epochs`` is stored beside it)."""
        return {
            "epoch": self.best_epoch,
            "metric": self.best_metric,
            "state": self.best_state,
            "head": self.best_head,
        }

    def load_state_dict(self, best: dict[str, Any], bad_epochs: int) -> None:
        self.best_epoch, self.best_metric = best["epoch"], best["metric"]
        self.best_state, self.best_head = best["state"], best["head"]
        self.bad_epochs = int(bad_epochs)


@dataclass
class Run:
    """Everything that trains, in one place (and what a checkpoint holds)."""

    cfg: FinetuneConfig
    model: Extractor
    head: nn.Module
    frozen: list[nn.Module]
    inputs: TrainInputs
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    head_at_start: bool  # the starting extractor had a head, and it is kept

    def uses_head(self, epoch: int) -> bool:
        """Whether the extractor returned at ``epoch`` embeds through the head (epoch 0: the
        starting extractor, with a head only when it had one)."""
        return self.cfg.head.kept and (epoch > 0 or self.head_at_start)

    def train_epoch(self) -> tuple[float, int]:
        """One pass over the train split; returns (mean loss, views processed)."""
        codes = self.inputs.codes
        batches = self.objective.sampler.batches(codes, self.generator)
        labels_all = torch.from_numpy(codes.astype(np.int64))
        set_train_mode(self.model, self.frozen, self.cfg.freeze_bn)
        self.head.train()
        total, views = 0.0, 0
        for idx in batches:
            loss = self.objective.loss(Batch(idx, labels_all[idx]))
            views += self.objective.views_per_image * len(idx)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ImgsearchError(
                    f"fine-tuning diverged: loss {value} (lower lr or raise temperature)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.objective.after_step()
            total += value
        return total / max(1, len(batches)), views

    def evaluate(self, epoch: int, loss: float, views: int, train_s: float) -> dict[str, float]:
        """The epoch's row of the history (see :mod:`imgsearch.train.finetune`)."""
        cfg, inputs = self.cfg, self.inputs
        emb, head_emb = embed(
            inputs.encode_val,
            self.head,
            inputs.val_x,
            cfg.eval_batch_size,
            self.model.spec.embedding_dim,
        )
        backbone = val_scores(emb, inputs.val_labels, cfg.val_max_queries, cfg.seed)
        head = (
            val_scores(head_emb, inputs.val_labels, cfg.val_max_queries, cfg.seed)
            if cfg.head_dims
            else backbone
        )
        chosen = head if self.uses_head(epoch) else backbone
        return {
            "epoch": float(epoch),
            "loss": loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "val_map_at_r": chosen["map_at_r"],
            "val_map": chosen["map"],
            "val_recall_at_1": chosen["recall_at_1"],
            "val_embedding_std": chosen["embedding_std"],
            "val_map_at_r_backbone": backbone["map_at_r"],
            "val_map_at_r_head": head["map_at_r"],
            "images_per_s": views / train_s if train_s > 0 else float("nan"),
            "epoch_seconds": train_s,
        }

    def observe(self, stopper: EarlyStopping, epoch: int, row: dict[str, float]) -> bool:
        return stopper.observe(epoch, row, self.model, self.head if self.uses_head(epoch) else None)

    def state_dict(self) -> dict[str, Any]:
        """The trained state: model, head, optimizer, scheduler, RNG states, the objective's."""
        return {
            "model": plain_state(self.model),
            "head": plain_state(self.head),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "sampler": self.generator.get_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["sampler"])
        self.objective.load_state_dict(state)


def build_run(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    start_head: nn.Module | None,
    trunk: TrunkStore | None = None,
) -> Run:
    """The model copy, its inputs, head, objective and optimizer (in this order: the head's
    initialisation draws from the seeded global RNG)."""
    size = cfg.train_size or extractor.spec.preprocess.size
    load_start = time.perf_counter()
    n_frozen = cfg.blocks_to_freeze(extractor.spec.name)
    model, frozen = prepare_model(extractor, cfg.method, size, n_frozen)
    inputs = prepare_inputs(model, manifest, cfg, trunk)
    head = build_head(model.spec.embedding_dim, cfg.head_dims, start_head)
    out_dim = cfg.head_dims[-1] if cfg.head_dims else model.spec.embedding_dim
    parts = Parts(model, head, inputs, out_dim, cfg.seed)
    objective = make_objective(cfg.method, cfg.objective, parts)
    steps_per_epoch = objective.sampler.steps_per_epoch(inputs.codes)
    log.info(
        "finetune %s: %d train images of %d items, %d val images, %d px, %s, "
        "%d steps/epoch (inputs ready in %.1fs)",
        cfg.method,
        len(inputs.train_x),
        inputs.n_items,
        len(inputs.val_x),
        size,
        describe(inputs, cfg),
        steps_per_epoch,
        time.perf_counter() - load_start,
    )
    optimizer, scheduler = build_optimizer(
        [model, head, *objective.modules()], cfg.optim, cfg.schedule, steps_per_epoch
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    head_at_start = cfg.head.kept and start_head is not None
    return Run(
        cfg, model, head, frozen, inputs, objective, optimizer, scheduler, generator, head_at_start
    )


@dataclass
class Progress:
    """Where a run stands: the history so far, the early-stopping state, the next epoch, the
    wall time of earlier sessions (a resumed run) and why it stopped ("" while it goes on)."""

    history: list[dict[str, float]]
    stopper: EarlyStopping
    next_epoch: int = 1
    elapsed_before: float = 0.0
    stop_reason: str = ""

    def checkpoint(self, run: Run, start_fp: str, elapsed_s: float) -> dict[str, Any]:
        """The checkpoint after the last finished epoch (see :mod:`imgsearch.train.checkpoint`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": run.cfg.to_dict(),
            "start_fingerprint": start_fp,
            "epoch": self.next_epoch - 1,
            **run.state_dict(),  # model, head, optimizer, scheduler, rng
            "best": self.stopper.state_dict(),
            "bad_epochs": self.stopper.bad_epochs,
            "history": self.history,
            "elapsed_s": elapsed_s,
            "stop_reason": self.stop_reason,
            **run.objective.state_dict(),
        }


def start(run: Run, ckpt: Path | None, start_fp: str, on_epoch: OnEpoch | None) -> Progress:
    """Resume from ``ckpt`` when it exists; else evaluate the starting extractor (epoch 0)."""
    progress = Progress([], EarlyStopping(run.cfg.stopping))
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        check_resumable(state, run.cfg, start_fp, ckpt)
        run.load_state_dict(state)
        progress.history = list(state["history"])
        progress.stopper.load_state_dict(dict(state["best"]), state["bad_epochs"])
        progress.next_epoch = int(state["epoch"]) + 1
        progress.elapsed_before = float(state["elapsed_s"])
        progress.stop_reason = str(state["stop_reason"])
        log.info("finetune: resuming from %s after epoch %d", ckpt, progress.next_epoch - 1)
        return progress
    row = run.evaluate(0, float("nan"), 0, 0.0)
    run.observe(progress.stopper, 0, row)
    progress.history.append(row)
    log.info("finetune epoch 0 (before training): val MAP@R %.4f", row["val_map_at_r"])
    if on_epoch is not None:
        on_epoch(0, dict(row))
    return progress


def train(
    run: Run,
    progress: Progress,
    ckpt: Path | None,
    start_fp: str,
    wall_start: float,
    on_epoch: OnEpoch | None,
) -> None:
    """Epochs until ``cfg.epochs``, early stopping or the time budget; sets ``stop_reason``."""
    cfg = run.cfg
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes is not None else math.inf
    last_epoch_s = 0.0
    while not progress.stop_reason and progress.next_epoch <= cfg.epochs:
        epoch = progress.next_epoch
        elapsed = progress.elapsed_before + (time.perf_counter() - wall_start)
        if elapsed + last_epoch_s > budget_s:
            progress.stop_reason = "time_budget"
            log.info(
                "finetune: stopping before epoch %d (time budget %.1f min)", epoch, cfg.max_minutes
            )
            break
        t0 = time.perf_counter()
        epoch_bn_stats(run.head)
        loss, views = run.train_epoch()
        train_s = time.perf_counter() - t0
        row = run.evaluate(epoch, loss, views, train_s)
        last_epoch_s = time.perf_counter() - t0
        run.observe(progress.stopper, epoch, row)
        progress.history.append(row)
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
        if progress.stopper.should_stop(row):
            progress.stop_reason = "early_stopping"
        elif epoch == cfg.epochs:
            progress.stop_reason = "epochs"
        progress.next_epoch = epoch + 1
        if ckpt is not None:
            elapsed = progress.elapsed_before + (time.perf_counter() - wall_start)
            save_checkpoint(progress.checkpoint(run, start_fp, elapsed), ckpt)
        if on_epoch is not None:
            on_epoch(epoch, dict(row))
    if not progress.stop_reason:
        progress.stop_reason = "epochs"


def best_extractor(run: Run, stopper: EarlyStopping) -> Extractor:
    """The model at the best epoch, in eval mode, with the kept head attached if any."""
    model = run.model
    model.load_state_dict(stopper.best_state)
    model.requires_grad_(True)
    model.eval()
    if stopper.best_head:
        run.head.load_state_dict(stopper.best_head)
        model = attach_head(model, run.head, run.cfg.head_dims, run.cfg.keep_backbone)
    return model


def _check_manifest(manifest: pd.DataFrame) -> None:
    needed = (schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT)
    missing = [c for c in needed if c not in manifest.columns]
    if missing:
        raise ConfigError(f"finetune: manifest lacks columns {missing}")
    if schema.PATH not in manifest.columns and schema.PRE_PATH not in manifest.columns:
        raise ConfigError("finetune: manifest has neither 'path' nor 'pre_path'")


def finetune(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: FinetuneConfig,
    on_epoch: OnEpoch | None = None,
    trunk: TrunkStore | None = None,
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

    ``trunk``: the baseline extraction's trunk artifact; when it was made by exactly this
    extractor's frozen blocks, their outputs are read from it instead of computed
    (:func:`imgsearch.train.inputs.prepare_inputs`).
    """
    wall_start = time.perf_counter()
    _check_manifest(manifest)
    start_fp = fingerprint(extractor)
    # A starting extractor with a head (an earlier keep_head run, e.g. the champion an incremental
    # run warm-starts from): the head is the projection head, trained on; the body trains as usual.
    extractor, start_head = split_head(extractor)
    if start_head is not None:
        cfg = dataclasses.replace(cfg, head_dims=tuple(extractor_head_dims(start_head)))
    ckpt = checkpoint_path(cfg)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(cfg.seed)
        run = build_run(extractor, manifest, cfg, start_head, trunk)
        progress = start(run, ckpt, start_fp, on_epoch)
        train(run, progress, ckpt, start_fp, wall_start, on_epoch)
    frame = pd.DataFrame(progress.history)
    metrics = summary(
        frame,
        progress.stopper.best_epoch,
        progress.stop_reason,
        run.inputs,
        run.model.spec.preprocess.size,
        wall_start,
    )
    model = best_extractor(run, progress.stopper)
    return FinetuneResult(model, frame, metrics, progress.stop_reason, run.inputs.failures)
