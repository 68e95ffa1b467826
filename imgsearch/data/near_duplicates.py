"""Near-duplicate pairs of images by perceptual hash (Hamming distance on hex ``imagehash`` strings)."""

from __future__ import annotations

import faiss
import numpy as np

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def near_pairs(
    phashes: list[str], items: list[str], max_distance: int, *, all_pairs: bool
) -> list[tuple[int, int, int]]:
    """Pairs ``(a, b, distance)`` with ``a < b`` and Hamming distance <= ``max_distance``.

    ``all_pairs`` compares every pair; otherwise only pairs within an item. Uses FAISS's binary
    flat index (exact, SIMD popcount): 15k 256-bit hashes all-pairs in about a second.
    Sorted by ``(b, a)``.
    """
    if len(phashes) < 2:
        return []
    codes = hash_bytes(phashes)
    if all_pairs:
        groups = [np.arange(len(phashes))]
    else:
        by_item: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_item.setdefault(item, []).append(i)
        groups = [np.array(m) for m in by_item.values() if len(m) > 1]
    found: list[tuple[int, int, int]] = []
    for members in groups:
        if len(members) <= 256:  # small group: numpy beats FAISS's per-call set-up
            dist_mat = _BYTE_POPCOUNT[codes[members][:, None, :] ^ codes[members][None, :, :]].sum(
                axis=-1, dtype=np.int64
            )
            for r, c in zip(*np.nonzero(dist_mat <= max_distance), strict=True):
                if r < c:
                    found.append((int(members[r]), int(members[c]), int(dist_mat[r, c])))
            continue
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        sub = np.ascontiguousarray(codes[members])
        index.add(sub)
        lims, dist, nbr = index.range_search(sub, max_distance + 1)  # radius is exclusive
        for q in range(len(members)):
            for k in range(int(lims[q]), int(lims[q + 1])):
                a, b = int(members[q]), int(members[int(nbr[k])])
                if a < b:
                    found.append((a, b, int(dist[k])))
    found.sort(key=lambda t: (t[1], t[0]))
    return found


def hash_bytes(phashes: list[str]) -> np.ndarray:
    """Hex hashes (all of one length) -> uint8 codes (n, nbytes), zero-padded to 8-byte words."""
    width = len(phashes[0])
    if any(len(h) != width for h in phashes):
        raise ValueError("perceptual hashes of different sizes cannot be compared")
    nbytes = -(-width // 16) * 8  # FAISS wants whole 64-bit words; equal padding adds no distance
    return np.frombuffer(
        b"".join(int(h, 16).to_bytes(nbytes, "big") for h in phashes), dtype=np.uint8
    ).reshape(len(phashes), nbytes)
