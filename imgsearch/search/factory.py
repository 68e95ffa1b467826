"""Which FAISS index to build: :class:`IndexConfig` and the automatic factory choice.

:func:`choose_factory`: ``Flat`` (exact) up to ``flat_max`` vectors; above, an inverted file
``IVF{nlist}`` with ``nlist`` the power of two nearest ``sqrt(n)`` (cells of about ``sqrt(n)``
vectors: cheap k-means training and a small coarse search), storing the vectors ``Flat`` when they
fit the memory budget, else ``SQ8`` (4x smaller), else ``PQ{m}``. Search parameters (``nprobe`` /
``efSearch``) left unset are tuned at build time (:mod:`imgsearch.search.measure`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss

from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

#: Metric names -> FAISS metric types.
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass
class IndexConfig:
    """How to build an index.

    factory: a FAISS factory string (``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32,Flat"``, ...) or
        ``"auto"`` for :func:`choose_factory`.
    metric: ``"ip"`` (inner product = cosine on unit vectors) or ``"l2"``.
    nprobe / ef_search: search parameters of IVF / HNSW indexes; ``None`` tunes them at build time
        to reach ``target_recall`` (recall@10 vs exact) on ``eval_queries`` sample queries.
    train_sample: at most this many vectors train an index that needs training (IVF, PQ, SQ).
    memory_budget_mb: what the stored vectors may take; drives the auto choice of Flat/SQ8/PQ.
    flat_max: up to this many vectors ``auto`` picks exact search.
    max_nprobe / max_ef_search: upper bounds of the tuning.
    seed: for sampling training vectors and evaluation queries.
    """

    factory: str = "auto"
    metric: str = "ip"
    nprobe: int | None = None
    ef_search: int | None = None
    target_recall: float = 0.95
    eval_queries: int = 500
    train_sample: int = 100_000
    memory_budget_mb: float = 4096.0
    flat_max: int = 50_000
    max_nprobe: int = 256
    max_ef_search: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(
                f"IndexConfig.metric must be one of {sorted(METRICS)}, got {self.metric!r}"
            )
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(
                f"IndexConfig.target_recall must be in (0, 1], got {self.target_recall}"
            )
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"IndexConfig.{name} must be >= 1 or null, got {value}")
        if self.eval_queries < 1 or self.train_sample < 1 or self.flat_max < 0:
            raise ConfigError(
                "IndexConfig: eval_queries and train_sample must be >= 1, flat_max >= 0"
            )


def _nearest_pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def choose_factory(n: int, d: int, memory_budget_mb: float = 4096.0, flat_max: int = 50_000) -> str:
    """The FAISS factory string for ``n`` vectors of dimension ``d`` (rule in the module docstring).

    >>> choose_factory(10_000, 512)
    'Flat'
    >>> choose_factory(1_000_000, 512)
    'IVF1024,Flat'
    >>> choose_factory(1_000_000, 512, memory_budget_mb=1024)
    'IVF1024,SQ8'
    """
    if n < 0 or d < 1:
        raise ValueError(f"choose_factory: need n >= 0 and d >= 1, got n={n}, d={d}")
    if n <= flat_max:
        return "Flat"
    nlist = max(16, _nearest_pow2(math.sqrt(n)))
    budget = memory_budget_mb * 2**20
    if n * d * 4 <= budget:
        return f"IVF{nlist},Flat"
    if n * d <= budget:
        return f"IVF{nlist},SQ8"
    # PQ: m bytes per vector; the largest divisor of d (<= d/2, so at least 2 dims per sub-quantiser)
    # that fits the budget, at least one byte per vector.
    m_fit = max(1, int(budget // max(n, 1)))
    divisors = [m for m in range(1, d // 2 + 1) if d % m == 0 and m <= m_fit]
    m = max(divisors) if divisors else 1
    return f"IVF{nlist},PQ{m}"
