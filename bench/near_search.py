"""The near-duplicate pair search: the multi-index (launch.neardup.near_pairs) against comparing all
pairs (all_pairs_within), side by side on the same hashes, in CPU seconds of this process (one
process: the scan's workers divide both alike).

    python -m bench.near_search                          # 10k, 100k uniform hashes; all pairs up to 100k
    python -m bench.near_search --sizes 10000,100000,400000 --all-pairs-up-to 100000 --json ns.json

Two sets of hashes. "uniform": random 64-bit values, the multi-index's best case (every bucket
equally full). "pictures": phashes of the generated photos of bench.near_duplicates, whose bits
are not independent: some chunk values are common, so buckets are uneven and there are more
candidates. Too slow to generate in the hundred thousands, so for them the bench reports the
candidate rate (the share of pairs the multi-index checks) against uniform hashes': the factor
by which its time grows on such pictures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.near_duplicates import original
from launch.neardup import CHUNKS, DEFAULT_THRESHOLD, all_pairs_within, chunk_values, near_pairs, perceptual_hash


def cpu_seconds(fn, *args) -> tuple[float, object]:
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


def uniform(n: int, seed: int = 0) -> np.ndarray:
    return np.unique(np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64))


def candidate_rate(values: np.ndarray, threshold: int) -> float:
    """The share of all pairs that some chunk puts within the multi-index's radius (all pairs of a
    sample, counted directly): what the search checks, before the 64-bit comparison."""
    radius = threshold // CHUNKS
    near = np.zeros((len(values), len(values)), bool)
    for chunk in range(CHUNKS):
        keys = chunk_values(values, chunk)
        near |= np.bitwise_count(keys[:, None] ^ keys[None, :]) <= radius
    upper = np.triu_indices(len(values), 1)
    return float(near[upper].mean())


def time_sizes(sizes: list[int], all_pairs_up_to: int, threshold: int) -> list[dict]:
    rows = []
    for n in sizes:
        values = uniform(n)
        multi_s, (i, _) = cpu_seconds(near_pairs, values, threshold)
        row = {"hashes": len(values), "multi_index_s": round(multi_s, 2), "pairs": len(i)}
        if n <= all_pairs_up_to:
            all_s, (k, _) = cpu_seconds(all_pairs_within, values, threshold)
            assert len(k) == len(i), "the two searches disagree"
            row.update(all_pairs_s=round(all_s, 2), ratio=round(all_s / multi_s, 1))
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="numbers of uniform hashes to search")
    p.add_argument("--all-pairs-up-to", type=int, default=100_000, help="compare all pairs too up to this size")
    p.add_argument("--pictures", type=int, default=2000, help="generated photos whose phashes give the rate")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = time_sizes([int(s) for s in args.sizes.split(",")], args.all_pairs_up_to, args.threshold)
    pictures = np.unique(np.array([perceptual_hash(original(seed)) for seed in range(args.pictures)], np.uint64))
    rates = {"uniform": candidate_rate(uniform(len(pictures)), args.threshold)}
    rates["pictures"] = candidate_rate(pictures, args.threshold)
    print(
        f"candidate rate at {args.threshold} bits: uniform {rates['uniform']:.5f}, pictures {rates['pictures']:.5f} "
        f"({rates['pictures'] / rates['uniform']:.1f}x; {len(pictures)} phashes)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threshold": args.threshold, "sizes": rows, "candidate_rate": rates}, f, indent=1)


if __name__ == "__main__":
    main()
