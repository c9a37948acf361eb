"""Hierarchical k-means + balanced sampling vs flat k-means and uniform sampling on long-tailed embeddings.

Data: ``--n`` unit vectors (float32, ``--d`` dims) around ``--centres`` random unit centres whose weights
follow Zipf(``--zipf``) (centre 0 the most frequent), Gaussian noise of norm ~``--noise``, renormalised.
The "tail" is the rarest 50% of centres by weight.

Methods, each keeping ``--fraction`` of the points:

* hierarchical: ``hierarchical_kmeans`` with ``--levels`` (default 2000,200,20) and the config's defaults
  for resampling (2 steps, 10 points per cluster) and niter (20), then ``balanced_sample``;
* flat k-means: one level with the same leaf count, no resampling, then ``balanced_sample`` (which on a
  one-level tree is an even split over clusters: the "flat k-means" baseline of Vo et al.);
* uniform: ``rng.choice`` without replacement, no clustering.

Levels: 2000 leaves for 1M points (~500 per leaf) matches the number of planted concepts, so tail concepts
can get leaves of their own; each level above groups ~10 clusters, the branching Vo et al. use (their
10M/500k/50k/10k levels branch 5-20x), and three levels take 1M points down to 20 top clusters.

Training subsample: each level is fitted on at most 256 points per centroid (``--max-points-per-centroid``,
faiss' own default cap, applied here explicitly through ``hierarchical_kmeans``): 512k of the 1M points for
the 2000 leaves, with every point assigned to the final centroids. Without it every k-means iteration scans all
1M points (estimated ~2x the clustering time; not measured).

Threads: ``_common`` pins numeric libraries to one thread; this benchmark is specified "on 2 cores", so
faiss' OpenMP pool (which also runs its BLAS) is set to ``THREADS = 2`` explicitly after import.
Each method runs in a fresh subprocess that regenerates the same data from the seed, so its peak RSS
(``resource.getrusage``) is its own; "RSS above data" subtracts the resident size right after generation
(data generation itself peaks at the data plus one 64 MiB block).

    python benchmarks/hierarchical_kmeans.py [--n 1000000] [--levels 2000,200,20] [--fraction 0.2]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from krea2_core.curation.clusters import Hierarchy, balanced_sample, hierarchical_kmeans
from krea2_core.curation.config import HierarchicalKMeansConfig

THREADS = 2
faiss.omp_set_num_threads(THREADS)
METHODS = ("hierarchical", "flat k-means", "uniform")
_RESULT = "RESULT "  # prefix of the worker's JSON line on stdout


def make_data(n: int, d: int, centres: int, zipf: float, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, true centre per point); generated in blocks so the peak is the float32 array plus one block."""
    rng = np.random.default_rng(seed)
    centre_vectors = rng.standard_normal((centres, d)).astype(np.float32)
    centre_vectors /= np.linalg.norm(centre_vectors, axis=1, keepdims=True)
    weights = np.arange(1, centres + 1, dtype=np.float64) ** -zipf
    labels = np.empty(n, dtype=np.int64)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65_536):
        block = slice(start, start + 65_536)
        labels[block] = rng.choice(centres, size=len(labels[block]), p=weights / weights.sum())
        x[block] = centre_vectors[labels[block]]
        x[block] += rng.standard_normal((len(x[block]), d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        x[block] /= np.linalg.norm(x[block], axis=1, keepdims=True)
    return x, labels


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def tail_stats(labels: np.ndarray, picked: np.ndarray, centres: int) -> dict[str, float]:
    """Coverage of the rarest half of the centres (by weight: ranks centres/2 .. centres-1)."""
    tail = np.arange(centres // 2, centres)
    kept = np.bincount(labels[picked], minlength=centres)
    head = max(centres // 100, 1)
    return {"kept": int(len(picked)), "tail_centres": int(len(tail)),
            "tail_centres_covered": int((kept[tail] > 0).sum()), "tail_mean_kept": float(kept[tail].mean()),
            "tail_share": float(kept[tail].sum() / max(len(picked), 1)),
            "head_1pct_share": float(kept[:head].sum() / max(len(picked), 1))}


def leaf_stats(h: Hierarchy, labels: np.ndarray, centres: int) -> dict[str, int]:
    """How the leaves split the data: leaves on the most frequent centre, leaves whose majority is a tail centre."""
    pair, count = np.unique(h.leaf * centres + labels, return_counts=True)
    leaf_of, centre_of = pair // centres, pair % centres
    majority = np.zeros(len(h.centroids[0]), dtype=np.int64) - 1
    by_count = np.lexsort((-count, leaf_of))  # per leaf, the most populated centre first
    first = np.r_[True, leaf_of[by_count][1:] != leaf_of[by_count][:-1]]
    majority[leaf_of[by_count][first]] = centre_of[by_count][first]
    return {"leaves": int(len(h.centroids[0])), "leaves_on_top_centre": int(np.unique(h.leaf[labels == 0]).size),
            "leaves_with_tail_majority": int((majority >= centres // 2).sum())}


def run_worker(method: str, args: argparse.Namespace) -> dict[str, object]:
    x, labels = make_data(args.n, args.d, args.centres, args.zipf, args.noise, args.seed)
    rss_data = current_rss_mib()
    target = int(round(args.fraction * args.n))
    levels = [int(k) for k in args.levels.split(",")]
    start = time.perf_counter()
    extra: dict[str, object] = {}
    if method == "uniform":
        picked = np.sort(np.random.default_rng(args.seed).choice(args.n, target, replace=False))
        cluster_s = 0.0
    else:
        config = (HierarchicalKMeansConfig(levels=levels, niter=args.niter, seed=args.seed) if method == "hierarchical"
                  else HierarchicalKMeansConfig(levels=levels[:1], resampling_steps=0, niter=args.niter, seed=args.seed))
        h = hierarchical_kmeans(x, config, max_points_per_centroid=args.max_points_per_centroid, threads=THREADS)
        cluster_s = time.perf_counter() - start
        picked = balanced_sample(h, target, seed=args.seed)
        extra = {"config": config.to_dict(), **leaf_stats(h, labels, args.centres)}
    total_s = time.perf_counter() - start
    return {"method": method, "seconds": total_s, "cluster_seconds": cluster_s, "sample_seconds": total_s - cluster_s,
            "peak_rss_mib": peak_rss_mib(), "rss_after_data_mib": rss_data,
            **tail_stats(labels, picked, args.centres), **extra}


def run_in_subprocess(method: str, argv: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", method], check=True, capture_output=True,
                          text=True)
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(_RESULT))
    return json.loads(line[len(_RESULT):])


def input_stats(args: argparse.Namespace) -> dict[str, float]:
    weights = np.arange(1, args.centres + 1, dtype=np.float64) ** -args.zipf
    weights /= weights.sum()
    tail, head = weights[args.centres // 2:], weights[: max(args.centres // 100, 1)]
    return {"tail_share": float(tail.sum()), "tail_mean_points": float(tail.mean() * args.n),
            "tail_min_points_expected": float(tail.min() * args.n), "head_1pct_share": float(head.sum()),
            "top_centre_points_expected": float(weights[0] * args.n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--noise", type=float, default=0.8, help="norm of the Gaussian noise before renormalising")
    parser.add_argument("--levels", default="2000,200,20", help="clusters per level, finest first")
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--max-points-per-centroid", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(_RESULT + json.dumps(run_worker(args.worker, args)))
        return

    argv = sys.argv[1:]
    data = input_stats(args)
    started = time.perf_counter()
    results = {method: run_in_subprocess(method, argv) for method in METHODS}
    elapsed = time.perf_counter() - started
    tail = args.centres - args.centres // 2
    headers = ["method", "wall s (cluster + sample)", "peak RSS MiB", "RSS above data MiB",
               f"tail centres with >= 1 kept (of {tail})", "mean kept per tail centre", "tail share of kept",
               "top-1% centres share of kept", "leaves on top centre", "leaves with tail majority"]
    rows = [["input (all points)", "", "", "", tail, data["tail_mean_points"], data["tail_share"],
             data["head_1pct_share"], "", ""]]
    for method, r in results.items():
        rows.append([method, f"{r['seconds']:.1f} ({r['cluster_seconds']:.1f} + {r['sample_seconds']:.2f})",
                     r["peak_rss_mib"], r["peak_rss_mib"] - r["rss_after_data_mib"], r["tail_centres_covered"],
                     r["tail_mean_kept"], r["tail_share"], r["head_1pct_share"],
                     r.get("leaves_on_top_centre", ""), r.get("leaves_with_tail_majority", "")])
    print(f"{args.n} x {args.d} float32, {args.centres} centres Zipf({args.zipf}), keep {args.fraction:.0%}, "
          f"faiss threads {THREADS}; total {elapsed:.0f}s")
    print(_common.markdown_table(headers, rows))
    path = _common.write_json("hierarchical_kmeans.json", {
        "benchmark": "hierarchical_kmeans",
        "machine": {**_common.machine_info(), "threads_per_method": THREADS},
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "input": data,
        "results": results,
        "total_seconds": elapsed,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
