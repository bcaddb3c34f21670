"""Near-duplicate images: a 64-bit perceptual hash per image, the pairs within a Hamming distance,
and the groups they form together with identical files.

The hash is imagehash's phash: the signs of the 8x8 lowest frequencies of the DCT of the image
shrunk to 32x32 grey, so it survives resizing, re-encoding and recolouring, and light crops up
to a few percent (bench/near_duplicates.py measures which copies it catches at each threshold).
Images below MIN_SIDE are neither hashed nor compared: smaller than the hash's own 32x32 input,
different pictures of one kind (digits, icons) hash alike and would all be called copies.

Pairs are searched among the distinct hash values (identical files and exact-hash copies
collapse into one) by multi-index hashing (Norouzi et al., 2012): cut into 4 chunks of 16 bits, two
hashes within t bits are within t // 4 bits in at least one chunk (pigeonhole), so each hash is
looked up only in the buckets of the chunk values that close to its own (137 of 65,536 at t = 10),
and the candidates are checked on all 64 bits. Exact, and about M^2 / 120 candidates for M
distinct hashes against all-pairs' M^2 / 2: 100,000 hashes take seconds, ImageNet's 1.28 M minutes
(BENCHMARKS.md). The chunk-and-mask tasks are spread over the scan's workers. Thresholds from 16
bits (a chunk radius of 4: 2,517 masks a chunk) compare all pairs, in cache-sized blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import combinations

import numpy as np
from PIL import Image

MODES = ("off", "report", "group")  # --near-duplicates: off, find and report, or also keep groups together
DEFAULT_MODE = "group"
DEFAULT_THRESHOLD = 10  # bits of 64; measured by bench/near_duplicates.py (BENCHMARKS.md "near-duplicate scan")
MIN_SIDE = 32  # px: the hash's 32x32 DCT input; below it look-alikes hash alike
BLOCK = 1 << 16  # hash pairs compared at once: 512 KB of XORs, which stay in cache (faster than larger)
CHUNKS, CHUNK_BITS = 4, 16  # the multi-index: 4 tables of 16-bit chunk values (65,536 buckets each)
MAX_CHUNK_RADIUS = 3  # above it (thresholds from 16 bits) the masks outnumber what they save: all pairs
CANDIDATES = 1 << 21  # candidate pairs checked at once (48 MB of indices and hashes)

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
    bits. ``mapper`` (the scan's Workers.map) spreads the work over processes."""
    values = np.ascontiguousarray(values, np.uint64)
    if threshold // CHUNKS > MAX_CHUNK_RADIUS:
        return all_pairs_within(values, threshold, mapper)
    masks = chunk_masks(threshold // CHUNKS)
    parts = np.array_split(masks, max(1, min(len(masks), 8)))  # a few tasks a chunk, for the workers
    tasks = ((values, chunk, part, threshold) for chunk in range(CHUNKS) for part in parts)
    return _joined(mapper(_chunk_pairs, tasks))


def chunk_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask of at most ``radius`` set bits: the chunk values within ``radius`` of a
    value v are v ^ mask."""
    masks = [sum(1 << b for b in bits) for r in range(radius + 1) for bits in combinations(range(CHUNK_BITS), r)]
    return np.array(masks, np.int64)


def chunk_values(values: np.ndarray, chunk: int) -> np.ndarray:
    """(M,) uint64 -> (M,) int64: each hash's 16-bit chunk ``chunk`` (0: the highest bits)."""
    shift = np.uint64(CHUNK_BITS * (CHUNKS - 1 - chunk))
    return ((values >> shift) & np.uint64((1 << CHUNK_BITS) - 1)).astype(np.int64)


def _chunk_pairs(task: tuple[np.ndarray, int, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs within ``threshold`` bits whose chunk ``chunk`` differs by one of ``masks``, and no
    earlier chunk is within the radius (that chunk's task finds them): each pair once, i < j."""
    values, chunk, masks, threshold = task
    radius = threshold // CHUNKS
    keys = chunk_values(values, chunk)
    order = np.argsort(keys, kind="stable")  # the bucket of value v: order[start[v]:start[v + 1]]
    start = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=1 << CHUNK_BITS))])
    earlier = [chunk_values(values, c) for c in range(chunk)]
    found = []
    for mask in masks.tolist():
        # A pair in two buckets is looked up from the lower one only (from the higher, the same mask
        # leads back): half the candidates. Within one bucket (mask 0) both orders come, j > i stays.
        rows = np.arange(len(keys)) if mask == 0 else np.flatnonzero(keys < keys ^ mask)
        wanted = keys[rows] ^ mask
        lo, counts = start[wanted], start[wanted + 1] - start[wanted]
        for a, b in _runs(counts):
            i, j = np.repeat(rows[a:b], counts[a:b]), _members(lo[a:b], counts[a:b], order)
            i, j = (i[j > i], j[j > i]) if mask == 0 else (np.minimum(i, j), np.maximum(i, j))
            near = np.bitwise_count(values[i] ^ values[j]) <= threshold
            i, j = i[near], j[near]
            for keys_before in earlier:  # found already where an earlier chunk was within the radius
                later = np.bitwise_count(keys_before[i] ^ keys_before[j]) > radius
                i, j = i[later], j[later]
            found.append((i, j))
    return _joined(found)


def _runs(counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """Ranges of lookups finding about CANDIDATES candidates each: a crowded bucket never builds one
    huge array."""
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(CANDIDATES, int(ends[-1]) if len(ends) else 0, CANDIDATES))
    bounds = [0, *cuts.tolist(), len(counts)]
    return zip(bounds[:-1], bounds[1:])


def _members(lo: np.ndarray, counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The buckets order[lo:lo + count] the lookups found, one after the other."""
    ends = np.cumsum(counts)
    offsets = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
    return order[np.repeat(lo, counts) + offsets]


def _joined(found: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several tasks' pairs as one (i, j) of int64 arrays."""
    found = list(found) or [(np.zeros(0), np.zeros(0))]
    i, j = (np.concatenate(side).astype(np.int64) for side in zip(*found))
    return i, j


def all_pairs_within(values: np.ndarray, threshold: int, mapper: Mapper = map) -> tuple[np.ndarray, np.ndarray]:
    """near_pairs by comparing every pair, for thresholds the multi-index does not pay for."""
    m = len(values)
    # Row ranges of about equal work (row r compares with the m - r - 1 rows after it), a few per
    # worker; each task carries the whole array (8 bytes a hash), so not too many either.
    bounds = np.unique(np.round(m - np.sqrt(np.linspace(1, 0, 33)) * m).astype(np.int64))
    tasks = ((values, int(a), int(b), threshold) for a, b in zip(bounds[:-1], bounds[1:]))
    return _joined(mapper(_rows_pairs, tasks))


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
