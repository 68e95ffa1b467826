"""Benchmark: does the fine-tuned extractor forget? The catalog's test split beside an out-of-domain
probe, for the baseline, the fine-tuned champion and two levers (issue 16, section 3).

Inputs: a finished demo (``--demo``: a folder holding ``mlflow.db`` and ``mlruns/``, read only)
gives the split manifest (run ``split``), the baseline extractor (run ``extract · baseline ...``)
and the fine-tuned one (run ``finetune · ...``). The probe is :func:`imgsearch.data.probe.probe_catalog`
of ``--probe-dir`` (default: Adwaita's 96x96 icons, category = context folder, without ``apps``
(one icon) and ``legacy`` (a mixture of the other contexts)).

Protocol: :func:`imgsearch.evaluate.retrieval.retrieval_scores` everywhere (each image queries the
others of its set; relevant = same emoji on val/test, same category on the probe; exact cosine).

Rows:

- ``baseline``: the ImageNet extractor (1280-d pooled backbone).
- ``champion``: the fine-tuned extractor as it embeds (through its head; with
  ``finetune.keep_backbone`` the pooled backbone embedding beside it, as ``concat`` below).
- ``wise a=..``: WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):
  backbone weights ``(1 - a) * pretrained + a * fine-tuned`` (only the trained blocks differ: the
  frozen ones are equal, checked), embedded two ways: ``head`` = through the fine-tuned
  projection head (the pretrained model has none, so the head is kept as trained; ``a = 1`` is the
  champion), ``bb`` = the pooled backbone embedding (``a = 0`` is the baseline).
- ``concat``: "keep the backbone embedding beside the head": ``[sqrt(w) * b, sqrt(1 - w) * h]``
  of the L2-normalised backbone embedding ``b`` and head output ``h``, so cosine =
  ``w cos(b) + (1 - w) cos(h)``; ``b`` from the (mixed) fine-tuned body (one forward pass) or
  the pretrained one (``concat-pre``: the baseline's vector beside the champion's, two passes);
  with ``--centred`` also ``concat-c``: ``b`` minus its mean over val (the pooled features are
  non-negative and share a large common component that flattens ``cos(b)``), renormalised.

The mixing weight is chosen on val MAP@R of the catalog, and (second rule) on val subject to the
probe's MAP@R >= ``--probe-min-ratio`` x the baseline's, measured on one half of the probe (even
positions per category) and reported on the other half too, so the constraint is not graded on
the images that chose it.

    python -m benchmarks.bench_forgetting --demo /tmp/full_clone
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from imgsearch import schema as S
from imgsearch.data.probe import ProbeConfig, probe_catalog
from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.evaluate.retrieval import retrieval_scores
from imgsearch.models.backbones import Extractor, backbone_blocks, load_extractor
from imgsearch.train.inputs import Top, split_at, trunk_outputs

FREEZE = 13  # the demo recipe's frozen MobileNetV2 blocks (configs/finetune.yaml)


def run_artifacts(demo: Path, prefix: str) -> Path:
    """The artifact folder of the newest finished run whose name starts with ``prefix``."""
    with sqlite3.connect(f"file:{demo / 'mlflow.db'}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT run_uuid, experiment_id FROM runs WHERE name LIKE ? AND status = 'FINISHED' "
            "ORDER BY start_time DESC LIMIT 1",
            (prefix + "%",),
        ).fetchone()
    if row is None:
        raise SystemExit(f"no finished run named {prefix!r}... in {demo / 'mlflow.db'}")
    return demo / "mlruns" / str(row[1]) / row[0] / "artifacts"


def mixed_body(base: Extractor, tuned: Extractor, a: float) -> Extractor:
    """``tuned`` with body weights ``(1 - a) * base + a * tuned`` (integer buffers from tuned)."""
    mix = copy.deepcopy(tuned)
    b_state, t_state = base.body.state_dict(), tuned.body.state_dict()
    state = {
        k: ((1 - a) * b_state[k] + a * v) if v.is_floating_point() else v
        for k, v in t_state.items()
    }
    mix.body.load_state_dict(state)
    return mix.eval()


@torch.no_grad()
def top_embed(top: nn.Module, cached: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat(
        [top(cached[i : i + batch].float()) for i in range(0, len(cached), batch)]
    ).numpy()


@torch.no_grad()
def head_embed(head: nn.Module, emb: np.ndarray) -> np.ndarray:
    head.eval()
    return l2_normalise(head(torch.from_numpy(emb)).float().numpy())


def concat(b: np.ndarray, h: np.ndarray, w: float) -> np.ndarray:
    return np.hstack([np.sqrt(w) * l2_normalise(b), np.sqrt(1 - w) * l2_normalise(h)])


def scores(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return retrieval_scores(emb, labels, ks=(10,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="folder with mlflow.db, mlruns/")
    parser.add_argument("--probe-dir", type=Path, default=Path("/usr/share/icons/Adwaita/96x96"))
    parser.add_argument("--probe-exclude", nargs="*", default=["apps", "legacy"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--concat-weights", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument(
        "--probe-min-ratio",
        type=float,
        default=0.99,
        help="the probe rule: half A's MAP@R at least this x the baseline's (1.0: may not fall)",
    )
    parser.add_argument(
        "--centred", action="store_true", help="also concat with the backbone minus its val mean"
    )
    parser.add_argument("--trunk-cache", type=Path, help="keep the frozen blocks' outputs here")
    parser.add_argument("--max-per-split", type=int, default=None, help="subsample val/test rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    manifest = pd.read_parquet(run_artifacts(args.demo, "split") / "manifest.parquet")
    base = load_extractor(run_artifacts(args.demo, "extract · baseline") / "extractor")
    tuned = load_extractor(run_artifacts(args.demo, "finetune ·") / "extractor")
    assert tuned.head is not None
    pre = base.spec.preprocess
    assert dataclasses.asdict(pre) == dataclasses.asdict(tuned.spec.preprocess)
    b_state, t_state = base.body.state_dict(), tuned.body.state_dict()
    trunk_keys = [k for k in t_state if int(k.split(".")[1]) < FREEZE]
    assert all(torch.equal(b_state[k], t_state[k]) for k in trunk_keys), "frozen blocks differ"
    n_diff = sum(not torch.equal(b_state[k], t_state[k]) for k in t_state)
    print(f"body tensors: {len(t_state)}, differing after fine-tuning: {n_diff}")

    probe = probe_catalog(args.probe_dir, ProbeConfig(exclude=tuple(args.probe_exclude)))
    pm = probe.manifest.assign(**{S.PRE_PATH: None})
    half = pm.groupby(S.CATEGORY).cumcount().to_numpy() % 2  # 0: choose, 1: report
    print(
        f"probe {args.probe_dir}: {len(pm)} images, "
        f"{pm[S.CATEGORY].value_counts().to_dict()}; rejected {len(probe.quarantine)} "
        f"({probe.quarantine[S.REASON].value_counts().to_dict()})"
    )

    sets: dict[str, pd.DataFrame] = {}
    for split in ("val", "test"):
        rows = manifest[manifest[S.SPLIT] == split].sort_values(S.IMAGE_ID).reset_index(drop=True)
        if args.max_per_split and len(rows) > args.max_per_split:
            items = rows[S.ITEM_ID].drop_duplicates().sample(frac=1.0, random_state=0)
            keep = items.iloc[: max(2, args.max_per_split * items.size // len(rows))]
            rows = rows[rows[S.ITEM_ID].isin(keep)].reset_index(drop=True)
        sets[split] = rows
    sets["probe"] = pm

    trunk, _ = split_at(base, FREEZE)
    cached: dict[str, torch.Tensor] = {}
    labels: dict[str, np.ndarray] = {}
    if args.trunk_cache and args.trunk_cache.exists():
        saved = torch.load(args.trunk_cache, weights_only=True)
        cached = saved["cached"]
        labels = {k: np.asarray(v) for k, v in saved["labels"].items()}
    for name, rows in sets.items():
        if name in cached:
            continue
        out, ok, failed = trunk_outputs(rows, pre, trunk, 64, torch.float32, False)
        if len(failed):
            print(f"{name}: {len(failed)} unreadable: {failed[S.REASON].value_counts().to_dict()}")
        cached[name] = out
        labels[name] = rows[S.ITEM_ID].astype(str).to_numpy()[ok]
    if args.trunk_cache and not args.trunk_cache.exists():
        labels_out = {k: v.tolist() for k, v in labels.items()}
        torch.save({"cached": cached, "labels": labels_out}, args.trunk_cache)
    print(
        f"embedded once through blocks[:{FREEZE}]: "
        + ", ".join(f"{k} {len(v)}" for k, v in cached.items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )

    def figures(embs: dict[str, np.ndarray]) -> dict[str, float]:
        val, test, prb = (scores(embs[k], labels[k]) for k in ("val", "test", "probe"))
        pa = scores(embs["probe"][half == 0], labels["probe"][half == 0])
        pb = scores(embs["probe"][half == 1], labels["probe"][half == 1])
        return {
            "val": val["map_at_r"],
            "test": test["map_at_r"],
            "probe": prb["map_at_r"],
            "probe_p10": prb["precision_at_10"],
            "probe_a": pa["map_at_r"],
            "probe_b": pb["map_at_r"],
        }

    results: dict[str, dict[str, float]] = {}
    backbones: dict[float, dict[str, np.ndarray]] = {}
    heads: dict[float, dict[str, np.ndarray]] = {}
    for a in sorted(set(args.alphas) | {0.0, 1.0}):
        top = Top(backbone_blocks(mixed_body(base, tuned, a))[FREEZE:]).eval()
        bb = {k: top_embed(top, v) for k, v in cached.items()}
        hh = {k: head_embed(tuned.head, v) for k, v in bb.items()}
        backbones[a], heads[a] = bb, hh
        results[f"wise a={a:g} bb"] = figures(bb)
        results[f"wise a={a:g} head"] = figures(hh)
    # the champion as it embeds: the head alone, or (finetune.keep_backbone) the backbone beside it
    w_kept = tuned.spec.backbone_weight
    champion = (
        figures({k: concat(backbones[1.0][k], heads[1.0][k], w_kept) for k in cached})
        if w_kept
        else results["wise a=1 head"]
    )
    results = {"baseline": results["wise a=0 bb"], "champion": champion, **results}
    if w_kept:
        print(f"champion keeps its backbone beside its head (backbone_weight {w_kept:g})")
    for w in args.concat_weights:
        for a in sorted(set(args.alphas)):
            b = backbones[a]
            results[f"concat a={a:g} w={w:g}"] = figures(
                {k: concat(b[k], heads[a][k], w) for k in b}
            )
        results[f"concat-pre w={w:g}"] = figures(
            {k: concat(backbones[0.0][k], heads[1.0][k], w) for k in cached}
        )
        if args.centred:
            for a in sorted(set(args.alphas)):
                mean = backbones[a]["val"].mean(axis=0)  # the catalog's common component
                results[f"concat-c a={a:g} w={w:g}"] = figures(
                    {k: concat(backbones[a][k] - mean, heads[a][k], w) for k in cached}
                )

    ref = results["baseline"]
    print(
        f"\n{'extractor':<24} {'val MAP@R':>9} {'test MAP@R':>16} {'probe MAP@R':>16} "
        f"{'probe P@10':>16} {'probe halves A/B MAP@R':>32}"
    )
    for name, f in results.items():
        print(
            f"{name:<24} {f['val']:9.3f} {f['test']:8.3f} ({f['test'] / ref['test']:4.2f}x) "
            f"{f['probe']:8.3f} ({f['probe'] / ref['probe']:4.2f}x) "
            f"{f['probe_p10']:8.3f} ({f['probe_p10'] / ref['probe_p10']:4.2f}x) "
            f"{f['probe_a']:7.3f}/{f['probe_b']:.3f} "
            f"({f['probe_a'] / ref['probe_a']:5.3f}x/{f['probe_b'] / ref['probe_b']:5.3f}x)"
        )

    def choose(names: list[str], ok: Callable[[dict[str, float]], bool]) -> str | None:
        fit = [n for n in names if ok(results[n])]
        return max(fit, key=lambda n: results[n]["val"]) if fit else None

    families = {
        "WiSE-FT head": [f"wise a={a:g} head" for a in sorted(set(args.alphas))],
        "WiSE-FT bb": [f"wise a={a:g} bb" for a in sorted(set(args.alphas))],
        "any lever": [n for n in results if n not in ("baseline", "champion")],
    }
    for family, names in families.items():
        for label, ok in (
            ("val", lambda f: True),
            (
                f"val, probe half A >= {args.probe_min_ratio}x",
                lambda f: f["probe_a"] >= args.probe_min_ratio * ref["probe_a"],
            ),
        ):
            pick = choose(names, ok)
            if pick is None:
                print(f"{family}, chosen on {label}: none qualifies")
                continue
            f = results[pick]
            print(
                f"{family}, chosen on {label}: {pick}: test {f['test'] / ref['test']:.2f}x, "
                f"probe {f['probe'] / ref['probe']:.2f}x (held-out half B "
                f"{f['probe_b'] / ref['probe_b']:.2f}x), P@10 {f['probe_p10'] / ref['probe_p10']:.2f}x"
            )
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
