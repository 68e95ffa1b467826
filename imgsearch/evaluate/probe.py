"""Retrieval on an out-of-domain probe: does an extractor still tell apart images far from the
catalog's domain (issue 16 section 3: fine-tuning that does not forget)?

The probe (:func:`imgsearch.data.probe.probe_catalog`: a folder of real images, category = folder)
is embedded with the extractor under evaluation and ranked with the catalog's protocol
(:func:`imgsearch.evaluate.retrieval.retrieval_scores`: each image queries all the others, exact
cosine), relevant = same category. Figures are the retrieval names with a ``probe_`` prefix
(``probe_map_at_r``, ``probe_precision_at_10``, ...), so they sit beside the test figures of the
same evaluate run and the promotion gate can read them (``promote.probe_min_ratio``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from imgsearch import schema as S
from imgsearch.data.probe import Probe
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.evaluate.retrieval import retrieval_scores
from imgsearch.models.backbones import Extractor

PREFIX = "probe_"


def probe_scores(
    extractor: Extractor,
    probe: Probe,
    ks: Sequence[int] = (1, 5, 10),
    extract_cfg: ExtractConfig | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """``(metrics, quarantine)``: the probe's retrieval figures for ``extractor`` (``probe_*``,
    plus the probe's own counts) and the probe's rejected rows with any image the extractor
    could not read. Raises ``ValueError`` when fewer than two probe images embed."""
    manifest = probe.manifest.assign(**{S.PRE_PATH: None})
    result = extract(extractor, manifest, extract_cfg, progress=False)
    if len(result.ids) < 2:
        raise ValueError(f"{len(result.ids)} probe images embedded: nothing to rank")
    labels = (
        manifest.set_index(S.IMAGE_ID).loc[np.asarray(result.ids, dtype=str), S.ITEM_ID].astype(str)
    )
    scores = retrieval_scores(
        np.asarray(result.embeddings[: len(result.ids)]), labels.to_numpy(), ks=ks
    )
    metrics = {f"{PREFIX}{k}": float(v) for k, v in scores.items()}
    metrics.update(probe.metrics)
    metrics[f"{PREFIX}n_unreadable"] = float(len(result.failures))
    quarantine = pd.concat([probe.quarantine, result.failures], ignore_index=True)
    return metrics, quarantine
