"""The 100M plan's arithmetic (benchmarks/bench_plan.py), against figures worked by hand."""

from __future__ import annotations

import pytest

from benchmarks.bench_plan import nlist_of, plan, pq_bytes


def test_plan_by_hand() -> None:
    # 1,000 images/s per core: 1e8 images = 1e5 core-seconds = 27.78 core-hours; 16 cores at 80%
    # = 12.8 effective cores -> 2.17 machine-hours -> 1 machine for a 24 h target
    p = plan(
        100_000_000,
        images_per_s_per_core=1000.0,
        bytes_per_vector=40.0,
        nlist=8192,
        dim=128,
        pq_m=32,
        add_per_s_per_core=20_000.0,
        train_s_measured=120.0,
        train_cores_measured=2,
        cores_per_machine=16,
        wall_hours=24.0,
        scaling=0.8,
    )
    assert p.embed_core_hours == pytest.approx(1e8 / 1000 / 3600)
    assert p.embed_machines == 1
    # 4e9 bytes of codes + 8192*128*4 coarse + 32*256*4*4 codebooks
    assert p.index_gb == pytest.approx((4e9 + 8192 * 128 * 4 + 32 * 256 * 4 * 4) / 1e9)
    assert p.add_hours == pytest.approx(1e8 / (20_000 * 12.8) / 3600)
    assert p.train_minutes == pytest.approx(120 * 2 / 12.8 / 60)


def test_machines_grow_with_slow_backbones() -> None:
    args = dict(
        bytes_per_vector=40.0,
        nlist=8192,
        dim=128,
        pq_m=32,
        add_per_s_per_core=1e4,
        train_s_measured=60.0,
        train_cores_measured=2,
    )
    # 5 images/s per core: 5,556 core-hours; 12.8 effective cores x 24 h = 307 -> 19 machines
    assert plan(100_000_000, 5.0, **args).embed_machines == 19  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        plan(100_000_000, 0.0, **args)  # type: ignore[arg-type]


def test_factory_parts() -> None:
    assert pq_bytes("IVF8192,PQ32") == 32
    assert pq_bytes("IVF8192,PQ32x8") == 32
    assert pq_bytes("IVF1024,Flat") == 0
    assert nlist_of("IVF8192,PQ32") == 8192
    assert nlist_of("Flat") == 0
