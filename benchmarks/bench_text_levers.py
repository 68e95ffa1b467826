"""Benchmark the text-search levers the issue names, side by side on one pipeline's runs.

Each lever is measured against the default alignment (``configs/align.yaml``) on the same runs
(default: the newest ``ingest``, ``split`` and ``extract`` runs of ``MLFLOW_TRACKING_URI``):

- ``default``: the align step's settings as configured.
- ``emojilib``: more text per item. The English keywords of ``emojilib@4.0.3`` (npm, MIT; about
  8 per emoji, fetched with ``npm pack`` like the demo) are added as training texts of kind
  ``keyword``. Queries stay the labels (and tag lists): keywords are never queries.
- ``locales``: the same emoji's labels and tags in more languages (CLDR annotations through
  ``emojibase-data``, the demo's own package; default ``uk``, Ukrainian, the locale nearest to
  Russian in its letters) as extra training texts; queries stay English and Russian.
- ``classnames``: what an ImageNet classifier knows. The 1,000 class names of the pretrained
  MobileNetV2 become extra training items: each class name's images are the 5 **train** images
  the classifier is surest of (the 300 classes with the most confident such images).
- ``conse``: a zero-shot term beside the learned projection (ConSE, Norouzi et al. 2014): each
  image's class probabilities under the pretrained classifier average the MiniLM vectors of the
  class names; an English query's MiniLM vector scores against that, weighted by ``lambda``
  and added to the aligned score. The softmax scale and ``lambda`` are chosen on val English
  label MAP@R. English queries only (MiniLM is English).

Every alignment fits on train items and stops on val, as the align step does; val picks, test is
reported beside the issue's targets and the chance level, and nothing is chosen on test. The
pretrained MobileNetV2's pooled features of every image are computed once (cached under
``benchmarks/out/``).

    python -m benchmarks.bench_text_levers [--levers default emojilib locales classnames conse]

Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.special
import torchvision
import yaml

from benchmarks.bench_text_search import TARGETS, add_run_args, inputs, print_table
from imgsearch.data.demo import default_cache_dir, npm_pack
from imgsearch.data.demo_texts import (
    TEXT_PACKAGE,
    TEXT_VERSION,
    emoji_texts,
    norm_hexcode,
    unpack_texts,
)
from imgsearch.data.imageio import open_rgb
from imgsearch.errors import FetchError
from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.evaluate.text_search import evaluate_text_search
from imgsearch.models.backbones import create_extractor
from imgsearch.models.text import make_text_tower
from imgsearch.models.weights import torchvision_state_dict
from imgsearch.search.query import embed_images
from imgsearch.train.align import AlignConfig, align, project

OUT = Path("benchmarks/out")
EMOJILIB = "emojilib@4.0.3"
CLASSES_KEPT = 300
PAIR_SCALE = 10.0  # the softmax scale of the class-name targets: ConSE's choice on val (below)
PAIR_IMAGES = 5  # train images per class name
SCALES = (5.0, 10.0, 20.0)
LAMBDAS = (0.25, 0.5, 1.0)
Encode = Callable[[Sequence[str]], np.ndarray]


def emojilib_texts(item_ids: Sequence[str]) -> pd.DataFrame:
    """English keyword rows ``(item_id, lang, kind, text)`` of the demo items from emojilib."""
    tgz = npm_pack(EMOJILIB, default_cache_dir() / "npm")
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.extractfile("package/dist/emoji-en-US.json")
        if member is None:
            raise FetchError(f"{tgz} has no dist/emoji-en-US.json")
        lib: dict[str, list[str]] = json.loads(member.read().decode("utf-8"))
    by_code = {norm_hexcode(i): str(i) for i in item_ids}
    rows = []
    for char, words in lib.items():
        item = by_code.get(norm_hexcode("-".join(f"{ord(c):04X}" for c in char)))
        if item is not None:
            rows += [(item, "en", "keyword", w.replace("_", " ")) for w in words]
    out = pd.DataFrame(rows, columns=["item_id", "lang", "kind", "text"]).drop_duplicates()
    print(f"emojilib: {len(out)} keywords for {out['item_id'].nunique()} of {len(by_code)} items")
    return out


def locale_texts(item_ids: Sequence[str], langs: Sequence[str]) -> pd.DataFrame:
    """Label and tag rows of ``langs`` from emojibase-data, with kinds renamed ``extra_*`` (never queries)."""
    tgz = npm_pack(f"{TEXT_PACKAGE}@{TEXT_VERSION}", default_cache_dir() / "npm")
    rows, rates = emoji_texts(unpack_texts(tgz, OUT, langs), item_ids)
    out = pd.DataFrame(rows, columns=["item_id", "lang", "kind", "text"])
    print(f"locales {list(langs)}: {len(out)} texts, match rates {rates}")
    return out.assign(kind="extra_" + out["kind"])


def imagenet_probe(images: pd.DataFrame, manifest_paths: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Pretrained MobileNetV2 logits ``(N, 1000)`` on unit pooled features, and the class names."""
    enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    cache = OUT / f"imagenet_logits_{len(images)}.npz"
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if list(data["ids"]) == images["image_id"].tolist():
            return data["logits"], list(enum.meta["categories"])
    state = torchvision_state_dict("mobilenet_v2", enum)
    extractor = create_extractor("mobilenet_v2")
    start = time.perf_counter()
    pooled = np.concatenate(
        [
            embed_images(extractor, [open_rgb(p) for p in manifest_paths.iloc[s : s + 256]])
            for s in range(0, len(manifest_paths), 256)
        ]
    )
    w, b = state["classifier.1.weight"].numpy(), state["classifier.1.bias"].numpy()
    logits = (pooled @ w.T + b).astype(np.float32)
    print(f"pretrained MobileNetV2 on {len(pooled)} images: {time.perf_counter() - start:.0f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=images["image_id"].to_numpy(dtype=str), logits=logits)
    return logits, list(enum.meta["categories"])


def softmax(logits: np.ndarray, scale: float) -> np.ndarray:
    return scipy.special.softmax(logits * scale, axis=1)


def classname_pairs(
    images: pd.DataFrame, emb: np.ndarray, logits: np.ndarray, names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Pseudo-items ``imagenet:<c>``: the class name as text, and as images the ``PAIR_IMAGES``
    **train** images the classifier is surest of (as an item has several drawings). Weighted
    means of many images are no target: they all collapse to the mean image (cosine 0.995)."""
    train = np.flatnonzero((images["split"] == "train").to_numpy())
    p = softmax(logits[train], PAIR_SCALE)
    kept = np.argsort(-p.max(axis=0))[:CLASSES_KEPT]
    top = np.argsort(-p[:, kept], axis=0)[:PAIR_IMAGES].T  # (classes, images) rows of train
    ids = [f"imagenet:{c}" for c in kept]
    texts = pd.DataFrame(
        {"item_id": ids, "lang": "en", "kind": "label", "text": [names[c] for c in kept]}
    )
    item_of = np.repeat(ids, PAIR_IMAGES)
    rows = pd.DataFrame(
        {"image_id": [f"{i}/{n}" for n, i in enumerate(item_of)], "item_id": item_of}
    ).assign(split="train")
    targets = emb[train[top.ravel()]]
    print(f"classnames: {len(kept)} classes, {PAIR_IMAGES} train images each")
    return texts, rows, targets


def scores(
    encode: Encode, texts: pd.DataFrame, images: pd.DataFrame, emb: np.ndarray, split: str
) -> dict[str, float]:
    return evaluate_text_search(encode, texts, images, emb, split=split).metrics


def fit(
    texts: pd.DataFrame, images: pd.DataFrame, emb: np.ndarray
) -> tuple[Encode, dict[str, float]]:
    cfg_file = yaml.safe_load(Path("configs/align.yaml").read_text())
    tower = make_text_tower(cfg_file["tower"], **(cfg_file.get("tower_options") or {}))
    start = time.perf_counter()
    result = align(texts, images, emb, tower, AlignConfig(**cfg_file["train"]))  # type: ignore[arg-type]
    info = {
        "epoch": result.best_epoch,
        "val_map@r": result.val_metrics["val_map_at_r"],
        "seconds": round(time.perf_counter() - start),
    }
    return (lambda t: project(result.head, tower.encode(t))), info


def row(name: str, info: dict, test: dict[str, float], langs: Sequence[str] = ("en", "ru")) -> dict:
    out: dict = {"lever": name, **info}
    for lang in langs:
        p = f"text_label_{lang}_"
        hit, mapr = test.get(p + "hit_at_10"), test.get(p + "map_at_r")
        out[f"{lang} hit@10"], out[f"{lang} MAP@R"] = hit, mapr
        out[f"{lang} vs target"] = (
            f"{(hit or 0) / TARGETS[lang][0]:.2f}x / {(mapr or 0) / TARGETS[lang][1]:.2f}x"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--levers", nargs="+", default=["default", "emojilib", "locales", "classnames", "conse"]
    )
    parser.add_argument("--locales", nargs="+", default=["uk"])
    add_run_args(parser)
    args = parser.parse_args()
    texts, images, emb, paths = inputs(args, with_paths=True)
    emb = np.asarray(emb, dtype=np.float32)
    val_en = "text_label_en_map_at_r"
    rows: list[dict] = []
    encode, info = fit(texts, images, emb)
    if "default" in args.levers or "conse" in args.levers:
        rows.append(row("default", info, scores(encode, texts, images, emb, "test")))
    if "emojilib" in args.levers:
        more = pd.concat([texts, emojilib_texts(sorted(set(texts["item_id"])))], ignore_index=True)
        enc, inf = fit(more, images, emb)
        rows.append(row("emojilib", inf, scores(enc, texts, images, emb, "test")))
    if "locales" in args.levers:
        more = pd.concat([texts, locale_texts(sorted(set(texts["item_id"])), args.locales)])
        enc, inf = fit(more.reset_index(drop=True), images, emb)
        rows.append(
            row(f"locales {'+'.join(args.locales)}", inf, scores(enc, texts, images, emb, "test"))
        )
    if {"classnames", "conse"} & set(args.levers):
        logits, names = imagenet_probe(images, paths)
    if "classnames" in args.levers:
        extra_t, extra_i, targets = classname_pairs(images, emb, logits, names)
        enc, inf = fit(
            pd.concat([texts, extra_t], ignore_index=True),
            pd.concat([images, extra_i], ignore_index=True),
            np.concatenate([emb, targets]),
        )
        rows.append(row("classnames", inf, scores(enc, texts, images, emb, "test")))
    if "conse" in args.levers:
        minilm = make_text_tower("minilm")
        class_vecs = l2_normalise(np.asarray(minilm.encode(names), dtype=np.float32))

        def conse(scale: float, lam: float) -> tuple[Encode, np.ndarray]:
            """The query encoder and the gallery with the zero-shot term beside the aligned one."""
            concept = l2_normalise((softmax(logits, scale) @ class_vecs).astype(np.float32))
            words = lambda t: l2_normalise(np.asarray(minilm.encode(t), dtype=np.float32))  # noqa: E731
            enc = lambda t: np.concatenate([encode(t), lam * words(t)], axis=1)  # noqa: E731
            return enc, np.concatenate([l2_normalise(emb), concept], axis=1)

        best = (-1.0, 0.0, 0.0)
        for scale in SCALES:
            for lam in LAMBDAS:
                enc_c, both = conse(scale, lam)
                val = scores(enc_c, texts, images, both, "val")
                print(
                    f"conse scale {scale} lambda {lam}: val English label MAP@R {val[val_en]:.4f}"
                )
                best = max(best, (val[val_en], scale, lam))
        _, scale, lam = best
        enc_c, both = conse(scale, lam)
        info_c = {**info, "chosen on val (en MAP@R)": f"scale {scale}, lambda {lam}: {best[0]:.3f}"}
        rows.append(
            row("conse (English)", info_c, scores(enc_c, texts, images, both, "test"), ("en",))
        )
    print_table(rows)


if __name__ == "__main__":
    main()
