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

Images are read as uint8 at the training size by the embedding reader
(:class:`imgsearch.embed.reader.ImageDataset`): from ``pre_path`` when the cached array was made
with exactly that preprocessing (its cache folder is that config's key), else by decoding
``path``, which is what extraction will do. An unreadable image becomes a quarantine row
(``failures``, stage ``finetune``, the reader's reason) and is counted (``n_unreadable``);
training goes on.

Checkpoints: with ``checkpoint_dir`` set, ``last.pt`` is written atomically after each epoch
(model, projection head, MoCo state, optimizer, scheduler, RNG states, history, best state so far)
with ``torch.save`` of plain tensors and containers, and read back with
``torch.load(weights_only=True)``: a checkpoint that needs arbitrary unpickling is refused with
:class:`CheckpointError`. Calling :func:`finetune` again with the same config, extractor and
``checkpoint_dir`` resumes after the last finished epoch; a finished run returns its result.
Resumed training reproduces an uninterrupted run (same data order, augmentations and updates) up
to floating-point non-determinism of the kernels.

The library never logs to a tracker: ``on_epoch(epoch, row)`` is how a caller records curves.

Where things are: :mod:`~imgsearch.train.config` (settings, one small config per component behind
the flat :class:`FinetuneConfig`), :mod:`~imgsearch.train.inputs` (images, batches, the frozen-trunk
cache), :mod:`~imgsearch.train.objectives` (SupCon, SimCLR, MoCo v2 behind one interface),
:mod:`~imgsearch.train.parts` (model copy, freezing, head, optimizer),
:mod:`~imgsearch.train.validation`, :mod:`~imgsearch.train.checkpoint` and
:mod:`~imgsearch.train.loop` (the loop, :class:`~imgsearch.train.loop.EarlyStopping` and
:func:`finetune`). This module is the public entry.
"""

from imgsearch.models.backbones import backbone_blocks
from imgsearch.train.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from imgsearch.train.config import CACHE_DTYPES, METHODS, OPTIMIZERS, FinetuneConfig
from imgsearch.train.inputs import load_images, split_at, trunk_outputs
from imgsearch.train.loop import EarlyStopping, finetune
from imgsearch.train.parts import attach_head, extractor_head_dims
from imgsearch.train.result import FinetuneResult
from imgsearch.train.samplers import pk_batches, random_batches

__all__ = [
    "CACHE_DTYPES",
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "METHODS",
    "OPTIMIZERS",
    "CheckpointError",
    "EarlyStopping",
    "FinetuneConfig",
    "FinetuneResult",
    "attach_head",
    "backbone_blocks",
    "extractor_head_dims",
    "finetune",
    "load_checkpoint",
    "load_images",
    "pk_batches",
    "random_batches",
    "save_checkpoint",
    "split_at",
    "trunk_outputs",
]
