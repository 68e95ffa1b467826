"""Watermarks: which catalog images the continuous-improvement job has already taken in.

A catalog source (identified by :func:`source_key`, a hash of what ingest says it read: the source
description and the data root) has one watermark: the image ids the job has taken in, each with
the sha256 of its file's bytes. The images of a run are the ingested rows that are neither in the
watermark nor in the champion's own data (:func:`select_new`); a row whose id is new but whose
bytes were already seen (the same file under another id) is a duplicate, not new data.

The watermark also lists ``untrained`` ids: images taken into the served index with the champion's
extractor (when the job decided to wait) that no fine-tuning has seen yet. They count towards the
"enough new data" trigger and join the next fine-tuning run's new data. And it lists ``held`` ids:
images of a new domain held for review (served, never trained on) until a person releases them
(``improve.release_held``); until then they neither count nor join a fine-tuning run.

A watermark is a small JSON file written atomically (:func:`save_watermark`: a temporary file in
the same folder, fsynced, then ``os.replace``): a crash leaves the old or the new file, never a
partial one. The job saves it only after its work is done and its decision logged, so a job killed
half-way is redone from the same watermark by the next run.

Pure: no MLflow, no tracking; the job in ``monitoring/improve.py`` decides when to load and save.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ImgsearchError
from imgsearch.paths import atomic_writer

FORMAT_VERSION = 1
DUPLICATE_OF_SEEN = "duplicate_of_seen"
_CHUNK = 1 << 20


class WatermarkError(ImgsearchError):
    """A watermark file exists but cannot be used (corrupt, another source's, unknown format)."""


def source_key(source: Mapping[str, Any]) -> str:
    """sha256 (hex) of a catalog source's description (canonical JSON, keys sorted).

    ``source`` is what ingest reports about the catalog it read (``catalog_source``,
    ``catalog_data_root``); passwords must already be masked (they are, in ingest's description).
    """
    text = json.dumps({str(k): str(v) for k, v in source.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str] | None) -> str | None:
    """sha256 (hex) of a file's bytes; ``None`` when it cannot be read (validate will say why)."""
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except (OSError, ValueError):
        return None
    return digest.hexdigest()


@dataclass
class Watermark:
    """What one catalog source has given the job so far.

        ``seen``: image id -> sha256 of its bytes (``""`` when unknown). ``untrained``: ids in the
        served index that no fine-tuning has seen yet. ``held``: ids in the served index held for review
    (a new domain): no fine-tuning may use them until released. ``history``: one short record per
    advance.
    """

    key: str
    source: dict[str, str] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)
    untrained: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    updated_at: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def seen_hashes(self) -> set[str]:
        return {h for h in self.seen.values() if h}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "source": dict(self.source),
            "updated_at": self.updated_at,
            "n_seen": len(self.seen),
            "seen": dict(sorted(self.seen.items())),
            "untrained": sorted(set(self.untrained)),
            "held": sorted(set(self.held)),
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Watermark:
        if data.get("format_version") != FORMAT_VERSION:
            raise WatermarkError(f"unknown watermark format {data.get('format_version')!r}")
        seen = data.get("seen")
        if not isinstance(seen, Mapping) or not isinstance(data.get("key"), str):
            raise WatermarkError("a watermark needs a 'key' string and a 'seen' mapping")
        return cls(
            key=str(data["key"]),
            source={str(k): str(v) for k, v in dict(data.get("source") or {}).items()},
            seen={str(k): str(v or "") for k, v in seen.items()},
            untrained=[str(i) for i in data.get("untrained") or []],
            held=[str(i) for i in data.get("held") or []],
            updated_at=data.get("updated_at"),
            history=list(data.get("history") or []),
        )

    def advanced(
        self,
        taken: Mapping[str, str | None],
        *,
        untrained: Iterable[str] = (),
        trained: Iterable[str] = (),
        held: Iterable[str] = (),
        released: Iterable[str] = (),
        record: Mapping[str, Any] | None = None,
        now: str | None = None,
    ) -> Watermark:
        """A new watermark with ``taken`` (id -> sha256) added, ``trained`` ids dropped from the
        untrained and held lists, ``untrained`` ids added to the untrained list, ``held`` ids to the
        held list, ``released`` ids moved from the held list to the untrained one, and ``record``
        appended to the history."""
        seen = dict(self.seen)
        seen.update({str(k): (v or "") for k, v in taken.items()})
        done = {str(i) for i in trained}
        free = {str(i) for i in released}
        kept = sorted(({i for i in self.held if i not in free} | {str(i) for i in held}) - done)
        moved = [i for i in self.held if i in free]
        pending = [i for i in self.untrained if i not in done]
        pending += [
            str(i) for i in [*untrained, *moved] if str(i) not in done and str(i) not in pending
        ]
        pending = [i for i in pending if i not in set(kept)]
        stamp = now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        history = [*self.history, {"at": stamp, "n_taken": len(taken), **dict(record or {})}]
        return Watermark(
            key=self.key,
            source=dict(self.source),
            seen=seen,
            untrained=sorted(set(pending)),
            held=kept,
            updated_at=stamp,
            history=history[-100:],  # the last 100 advances; MLflow keeps every run's copy
        )


def watermark_path(directory: Path | str, key: str) -> Path:
    return Path(directory) / f"{key[:24]}.json"


def load_watermark(
    directory: Path | str, key: str, source: Mapping[str, str] | None = None
) -> Watermark:
    """The watermark of source ``key`` under ``directory``; an empty one when there is none yet.

    Raises :class:`WatermarkError` when the file is unreadable or belongs to another key: a
    corrupt watermark must stop the job, not make it take the whole catalog in again.
    """
    path = watermark_path(directory, key)
    if not path.exists():
        return Watermark(key=key, source=dict(source or {}))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WatermarkError(f"cannot read watermark {path}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise WatermarkError(f"watermark {path} does not hold a JSON object")
    wm = Watermark.from_dict(data)
    if wm.key != key:
        raise WatermarkError(f"watermark {path} belongs to source {wm.key[:16]}, not {key[:16]}")
    return wm


def save_watermark(wm: Watermark, directory: Path | str) -> Path:
    """Write ``wm`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = watermark_path(directory, wm.key)
    with atomic_writer(final) as fh:
        fh.write(json.dumps(wm.to_dict(), indent=1, sort_keys=True).encode("utf-8"))
    return final


@dataclass
class NewData:
    """The outcome of :func:`select_new`.

    ``new``: the rows to take in this run (with a ``sha256`` column; ``None`` when unreadable);
    ``duplicates``: quarantine-schema rows whose bytes were already seen under another id;
    ``deferred``: new rows left for a later run by ``max_new``; ``n_seen``: rows already known.
    """

    new: pd.DataFrame
    duplicates: pd.DataFrame
    deferred: pd.DataFrame
    n_seen: int

    def metrics(self) -> dict[str, float]:
        return {
            "n_catalog": float(self.n_seen + len(self.new) + len(self.duplicates)),
            "n_already_seen": float(self.n_seen),
            "n_new_candidates": float(len(self.new)),
            "n_duplicates_of_seen": float(len(self.duplicates)),
            "n_deferred": float(len(self.deferred)),
        }


def select_new(
    manifest: pd.DataFrame,
    seen_ids: Iterable[str],
    seen_hashes: Iterable[str] = (),
    *,
    max_new: int | None = None,
    hashes: Sequence[str | None] | None = None,
) -> NewData:
    """Split ingested ``manifest`` rows into already seen, new, and duplicates of seen bytes.

    A row is seen when its ``image_id`` is in ``seen_ids``. Of the others, the file's sha256 is
    computed (``hashes`` gives them precomputed, one per row of ``manifest``); a row whose sha256
    is in ``seen_hashes``, or repeats an earlier new row's, is a duplicate (quarantine reason
    ``duplicate_of_seen``; validate catches repeats within the new rows itself, so those stay).
    ``max_new``: keep at most this many new rows (in ``image_id`` order), defer the rest.
    """
    if schema.IMAGE_ID not in manifest.columns:
        raise ValueError(f"manifest lacks {schema.IMAGE_ID!r}")
    if max_new is not None and max_new < 1:
        raise ValueError(f"max_new must be >= 1 or None, not {max_new!r}")
    ids = manifest[schema.IMAGE_ID].astype(str)
    known = {str(i) for i in seen_ids}
    is_seen = ids.isin(known).to_numpy()
    candidates = manifest.loc[~is_seen].copy()
    if hashes is None:
        paths = (
            candidates[schema.PATH]
            if schema.PATH in candidates.columns
            else pd.Series([None] * len(candidates), index=candidates.index)
        )
        cand_hashes = [file_sha256(p) for p in paths]
    else:
        if len(hashes) != len(manifest):
            raise ValueError("hashes must have one entry per manifest row")
        cand_hashes = [h for h, s in zip(hashes, is_seen, strict=True) if not s]
    candidates[schema.SHA256] = pd.Series(cand_hashes, index=candidates.index, dtype=object)
    known_hashes = {h for h in seen_hashes if h}
    dup = candidates[schema.SHA256].isin(known_hashes).to_numpy()
    duplicates = candidates.loc[dup]
    new = candidates.loc[~dup].sort_values(schema.IMAGE_ID, kind="stable")
    deferred = new.iloc[0:0]
    if max_new is not None and len(new) > max_new:
        new, deferred = new.iloc[:max_new], new.iloc[max_new:]
    quarantine = schema.quarantine_rows(
        [
            {
                schema.IMAGE_ID: str(row[schema.IMAGE_ID]),
                schema.ITEM_ID: None if pd.isna(row.get(schema.ITEM_ID)) else row[schema.ITEM_ID],
                schema.URI: row.get(schema.URI),
                schema.STAGE: "ingest",
                schema.REASON: DUPLICATE_OF_SEEN,
                schema.DETAIL: f"sha256 {row[schema.SHA256][:16]}... already taken in",
                schema.DETECTED_FORMAT: None,
            }
            for _, row in duplicates.iterrows()
        ]
    )
    return NewData(
        new=new.reset_index(drop=True),
        duplicates=quarantine,
        deferred=deferred.reset_index(drop=True),
        n_seen=int(is_seen.sum()),
    )


def replay_sample(
    old_train_ids: Sequence[str],
    old_items: Sequence[str],
    new_items: Iterable[str],
    n_random: int,
    seed: int = 0,
    same_items: bool = True,
) -> list[str]:
    """Old training images to replay next to the new ones (against forgetting).

    ``old_train_ids`` and ``old_items`` are parallel (image id, item id). With ``same_items`` the
    old images of the items that have new images are always replayed (they are the new images'
    positives for item-aware losses); then ``n_random`` of the other old images are drawn
    without replacement, seeded. Returns image ids in the input order.
    """
    if len(old_train_ids) != len(old_items):
        raise ValueError("old_train_ids and old_items must be parallel")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, not {n_random}")
    touched = {str(i) for i in new_items} if same_items else set()
    must = np.array([str(it) in touched for it in old_items], dtype=bool)
    rest = np.flatnonzero(~must)
    take = min(n_random, len(rest))
    chosen = np.zeros(len(old_train_ids), dtype=bool)
    chosen[must] = True
    if take:
        chosen[np.random.default_rng(seed).choice(rest, take, replace=False)] = True
    return [str(old_train_ids[int(i)]) for i in np.flatnonzero(chosen)]


ON_NOVEL = ("review", "improve")
#: ``imgsearch.improve.alert`` value of a run whose new data was held as a new domain.
ALERT_NEW_DOMAIN = "new_domain"


def decide(
    drift_detected: bool | None,
    n_new: int,
    n_pending: int,
    min_new_images: int,
    *,
    kind: str | None = None,
    novel_share: float | None = None,
    on_novel: str = "review",
) -> tuple[str, str]:
    """``(decision, reason)``: ``improve``, ``wait`` or ``skip``.

    ``n_new``: new images this run (after validation); ``n_pending``: images already served but
    not yet trained on (they count towards ``min_new_images``). ``kind``: the drift stage's
    ``none`` | ``shift`` | ``novel`` (``None``: not measured, read as ``shift`` when there is
    drift); ``novel_share``: its share of new images far from everything in the reference.

    ``skip`` when nothing is new. Drift of kind ``novel`` (a new domain) with ``on_novel:
    review`` is ``wait``, whatever the counts: the new images are served (added to the index) but
    the champion is not fine-tuned on a new domain unattended; ``on_novel: improve`` treats it
    like any drift. Otherwise ``improve`` on drift or when ``n_new + n_pending >=
    min_new_images``, else ``wait``. Raises ``ValueError`` for an unknown ``on_novel``.
    """
    if on_novel not in ON_NOVEL:
        raise ValueError(f"on_novel must be one of {ON_NOVEL}, not {on_novel!r}")
    if n_new <= 0:
        return "skip", "no new data"
    total = n_new + max(n_pending, 0)
    counted = f"{n_new} new" + (f" + {n_pending} pending" if n_pending > 0 else "") + " images"
    if drift_detected and kind == "novel" and on_novel == "review":
        share = "most" if novel_share is None else f"{novel_share:.0%}"
        return "wait", (
            f"new domain: {share} of new images are far from everything in the reference; "
            f"held for review: served, not trained on until improve.release_held: true "
            f"(on_novel: improve trains on a new domain at once) ({counted})"
        )
    if drift_detected:
        what = "new domain" if kind == "novel" else "drift"
        return "improve", f"{what} detected ({counted})"
    if total >= min_new_images:
        return "improve", f"{counted} >= min_new_images {min_new_images}"
    return "wait", f"no drift and {counted} < min_new_images {min_new_images}"
