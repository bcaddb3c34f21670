"""Near-duplicate images: a 64-bit perceptual hash per image, the pairs within a Hamming distance,
and the groups they form together with identical files.

The hash is imagehash's phash: the signs of the 8x8 lowest frequencies of the DCT of the image
shrunk to 32x32 grey, so it survives resizing, re-encoding and recolouring, and light crops up
to a few percent (bench/near_duplicates.py measures which copies it catches at each threshold).
Images below MIN_SIDE are neither hashed nor compared: smaller than the hash's own 32x32 input,
different pictures of one kind (digits, icons) hash alike and would all be called copies.

Pairs are searched among the distinct hash values (identical files and exact-hash copies
collapse into one), all against all, in cache-sized blocks of numpy XOR + popcount, the row
ranges spread over the scan's workers: O(M^2) time for M distinct hashes at a few ns a pair,
O(M) memory. 100,000 images are 5e9 pairs, about a minute on a busy 2-core machine (BENCHMARKS.md),
against the scan's ~10 minutes; at ImageNet's 1.28 M it would be hours: a multi-index search
(pigeonhole over hash chunks) is the step up when that matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

MODES = ("off", "report", "group")  # --near-duplicates: off, find and report, or also keep groups together
DEFAULT_MODE = "group"
DEFAULT_THRESHOLD = 10  # bits of 64; measured by bench/near_duplicates.py (BENCHMARKS.md "near-duplicate scan")
MIN_SIDE = 32  # px: the hash's 32x32 DCT input; below it look-alikes hash alike
BLOCK = 1 << 16  # hash pairs compared at once: 512 KB of XORs, which stay in cache (faster than larger)

Mapper = Callable[[Callable, Iterable], Iterator]


def perceptual_hash(img: Image.Image) -> int:
    """The 64-bit phash of ``img`` (any mode) as an unsigned integer."""
    import imagehash  # imports scipy's FFT: only for a scan that hashes

    return hash_bits(imagehash.phash(img))


def hash_bits(h) -> int:
    """An imagehash.ImageHash (an 8x8 bool array) -> the 64-bit integer of its bits, row by row."""
    return int.from_bytes(np.packbits(np.asarray(h.hash, bool).ravel()).tobytes(), "big")


def pair_distances(hashes: np.ndarray) -> np.ndarray:
    """(M,) uint64 -> (M, M) uint8 Hamming distances (for a few thousand hashes at most)."""
    hashes = np.asarray(hashes, np.uint64)
    return np.bitwise_count(hashes[:, None] ^ hashes[None, :])


def near_pairs(values: np.ndarray, threshold: int, mapper: Mapper = map) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (M,) uint64 hashes -> (i, j) index arrays, i < j, of every pair within ``threshold``
    bits. ``mapper`` (the scan's Workers.map) spreads the row ranges over processes."""
    values = np.ascontiguousarray(values, np.uint64)
    m = len(values)
    # Row ranges of about equal work (row r compares with the m - r - 1 rows after it), a few per
    # worker; each task carries the whole array (8 bytes a hash), so not too many either.
    bounds = np.unique(np.round(m - np.sqrt(np.linspace(1, 0, 33)) * m).astype(np.int64))
    tasks = ((values, int(a), int(b), threshold) for a, b in zip(bounds[:-1], bounds[1:]))
    found = list(mapper(_rows_pairs, tasks))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _rows_pairs(task: tuple[np.ndarray, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), a <= i < b, i < j, within ``threshold`` bits."""
    values, a, b, threshold = task
    m = len(values)
    rows = max(1, BLOCK // max(m, 1))
    out_i, out_j = [], []
    for start in range(a, b, rows):
        stop = min(start + rows, b)
        near = np.bitwise_count(values[start:stop, None] ^ values[None, start:]) <= threshold
        i, j = np.nonzero(near)
        i, j = i + start, j + start
        keep = j > i
        out_i.append(i[keep])
        out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


def near_groups(
    hashes: np.ndarray, candidates: np.ndarray, same: np.ndarray, threshold: int, mapper: Mapper = map
) -> np.ndarray:
    """-> (N,) int64 group ids: files whose hashes are within ``threshold`` bits (directly or
    through a chain), or that are identical (equal ``same`` ids), share an id.

    Only ``candidates`` (hashed images of MIN_SIDE and more) are compared; every other file keeps
    its identical-file group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(same)
    candidates = np.asarray(candidates, np.int64)
    values, value_of = np.unique(hashes[candidates], return_inverse=True)
    vi, vj = near_pairs(values, threshold, mapper)
    # One graph, union-find by connected components: nodes are the files, then the distinct hash
    # values, then the identical-file groups; a file is joined to its hash value and its group.
    base_v, base_s = n, n + len(values)
    src = np.concatenate([candidates, base_v + vi, np.arange(n)])
    dst = np.concatenate([base_v + value_of.ravel(), base_v + vj, base_s + same])
    size = base_s + int(same.max(initial=-1)) + 1
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(size, size))
    _, label = connected_components(graph, directed=False)
    return label[:n].astype(np.int64)


def max_distance(hashes: np.ndarray) -> int:
    """The largest Hamming distance between any two of ``hashes`` (a group's), in blocks."""
    values = np.unique(np.asarray(hashes, np.uint64))
    rows = max(1, BLOCK // max(len(values), 1))
    blocks = (np.bitwise_count(values[s : s + rows, None] ^ values[None, :]) for s in range(0, len(values), rows))
    return max((int(b.max()) for b in blocks), default=0)


def hashable(width, height):
    """Which images (ints or arrays of sizes) are large enough to hash and compare (see MIN_SIDE)."""
    return np.minimum(width, height) >= MIN_SIDE
