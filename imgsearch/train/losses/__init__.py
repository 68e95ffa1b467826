"""Contrastive losses for fine-tuning an extractor, one per file (the lightly-ai layout).

- :func:`nt_xent_loss` - SimCLR's NT-Xent (Chen et al. 2020): two views per image, the other view
  is the only positive.
- :func:`supcon_loss` - supervised contrastive loss (Khosla et al. 2020): every other image (or
  view) with the same label is a positive; item-aware when the labels are item ids.
- :func:`moco_loss` and :class:`MoCo` - MoCo v2's InfoNCE against a queue of negatives, with a
  momentum-updated key encoder (He et al. 2020; Chen et al. 2020).

Every loss L2-normalises its inputs, takes ``temperature > 0`` and raises ``ValueError`` on
malformed input (wrong shapes, too small a batch, a non-positive temperature).
"""

from imgsearch.train.losses.clip import ClipLoss, clip_loss
from imgsearch.train.losses.moco import MoCo, moco_loss
from imgsearch.train.losses.ntxent import nt_xent_loss
from imgsearch.train.losses.supcon import supcon_loss

__all__ = ["ClipLoss", "clip_loss", "MoCo", "moco_loss", "nt_xent_loss", "supcon_loss"]
