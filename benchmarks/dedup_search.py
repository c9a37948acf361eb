"""The near-duplicate search alone, ours against faiss' IndexBinaryMultiHash, on real pHash codes at growing n.

    python benchmarks/dedup_search.py --scores /tmp/scale/outputs     # a curation_scale.py --workdir's outputs
    python benchmarks/dedup_search.py --scores path/to/scores.parquet --sizes 10000 30000 100000

Takes the pHash codes of a Scores table (the largest scores artifact under a directory, or a file), the first n
readable rows for each size (curation_scale.py's pools are prefixes of one pool, so these are its pools' codes),
and times, one thread, each in the same run:
- ours: ``krea2_core.data.dedup.near_pairs`` (multi-index hashing over direct-addressed buckets, shuffled bits);
- baseline: faiss ``IndexBinaryMultiHash`` with the same (substrings, bits, flips) plan, range search, which was
  our implementation up to 39c0db8;
and checks that both return the same pairs (both are exact). Prints a Markdown table and the growth exponent
between sizes; writes benchmarks/results/dedup_search.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import _common  # noqa: E402
from krea2_core.curation.config import DedupConfig  # noqa: E402
from krea2_core.data import hashing  # noqa: E402
from krea2_core.data.dedup import _multihash_plan, near_pairs  # noqa: E402


def scores_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("scores.parquet"), key=lambda f: f.stat().st_size)
    if not found:
        raise SystemExit(f"no scores.parquet under {path}")
    return found[-1]


def faiss_pairs(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    nhash, sub_bits, nflip = _multihash_plan(len(codes), codes.shape[1] * 8, radius)
    index = faiss.IndexBinaryMultiHash(codes.shape[1] * 8, nhash, sub_bits)
    index.nflip = nflip
    index.add(codes)
    limits, _, found = index.range_search(codes, radius + 1)
    queries = np.repeat(np.arange(len(codes)), np.diff(limits.astype(np.int64)))
    upper = queries < found
    return queries[upper], found[upper]


def best_of(repeats: int, search, codes: np.ndarray, radius: int) -> tuple[float, set[tuple[int, int]]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        i, j = search(codes, radius)
        times.append(time.perf_counter() - start)
    return min(times), set(zip(i.tolist(), j.tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scores", type=Path, required=True, help="a Scores parquet, or a directory holding some")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    path = scores_file(args.scores)
    table = pd.read_parquet(path, columns=["phash", "error_reason"])
    radius = DedupConfig().max_phash_distance
    rows = []
    for n in args.sizes:
        part = table.iloc[:n]
        codes = np.ascontiguousarray(hashing.codes(part.loc[part["error_reason"].isna(), "phash"].tolist()))
        ours_s, ours = best_of(args.repeats, near_pairs, codes, radius)
        base_s, base = best_of(args.repeats, faiss_pairs, codes, radius)
        assert ours == base, f"n={n}: the searches disagree on {len(ours ^ base)} pairs"
        rows.append({"images": n, "codes": len(codes), "pairs": len(ours), "plan": _multihash_plan(len(codes), 144, radius),
                     "ours_s": ours_s, "faiss_multihash_s": base_s, "speedup": base_s / ours_s})
    for previous, row in zip(rows, rows[1:], strict=False):
        growth = math.log(row["codes"] / previous["codes"])
        row["ours_exponent"] = math.log(row["ours_s"] / previous["ours_s"]) / growth
        row["faiss_exponent"] = math.log(row["faiss_multihash_s"] / previous["faiss_multihash_s"]) / growth
    print(f"pHash codes from {path}, radius {radius}, best of {args.repeats}, 1 thread\n")
    print(_common.markdown_table(
        ["images", "codes searched", "pairs", "ours s", "faiss MultiHash s", "ours x faster", "growth ours / faiss"],
        [[r["images"], r["codes"], r["pairs"], f"{r['ours_s']:.2f}", f"{r['faiss_multihash_s']:.2f}",
          f"{r['speedup']:.1f}", f"n^{r['ours_exponent']:.2f} / n^{r['faiss_exponent']:.2f}" if "ours_exponent" in r
          else ""] for r in rows]))
    _common.write_json("dedup_search.json", {"scores": str(path), "radius": radius, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
