"""Curation at scale: ingest + scoring + selection on 10k, 30k and 100k generated images, 2 cores, Ray.

One pool is generated once, at the largest size; each smaller pool is its prefix (a folder of hard links to the first
n files), so image k is the same file at every size. Pool contents (long side log-uniform in 96-1024 px, aspect
1-2.5, 60% landscape; ~70% JPEG q80-95, 20% PNG, 10% WebP q80-95):

* originals (~88%): world scenes (``krea2_core.world.render(sample_scene(...))``, 1-6 shapes) rendered up to 30%
  larger and cropped, maybe mirrored, hue-rotated and lit by a random smooth colour field, because plain world
  scenes repeat layouts: about 1 random pair in 23k is within the dedup thresholds (pHash and colorhash), which
  would plant ~200k unintended duplicate pairs in 100k images; measured 0 pairs in 2M for these;
* planted duplicates (~10%): a copy of an original 1-20 positions earlier (so every prefix holds its own planted
  pairs): byte-identical, re-encoded (JPEG -> JPEG q55-75, PNG or WebP; PNG/WebP -> JPEG q80-95) or resized to
  50-80% (only where the short side stays >= 48 px: the stage's min_side is 32);
* defects (~2%): the world pool's content defects (``content_defect``: noise, overexposed, underexposed, flat,
  letterbox, frame), each of which one content filter must reject.

Generation runs in 2 processes before anything is timed; its time and disk use are reported separately, and
``--keep-pool`` keeps the pool in ``--workdir`` for the next run (a larger size only generates the missing tail).

Timed, per size, in this process, with the real stage entry points (``krea2_core.data.stages``) under a scratch
output root ``<workdir>/outputs`` with its local MLflow store (MLFLOW_TRACKING_URI is unset), so every phase also
includes its Parquet writes, schema checks, manifest and MLflow run:

* ingest     ``run_ingest({"source": <pool folder>})``: listing, folder digest, header probe (Ray), raw_pool.parquet;
* scoring    ``run_scoring`` with ``AnalysisConfig()``: read, decode, filter scores, md5/pHash/colorhash (Ray);
* selection  ``run_selection`` for the tiny preset's ``256`` stage (``StageFilters(min_side=32)``, ``DedupConfig()``):
             filters + dedup over the survivors, verdicts.parquet / kept.parquet (one process).

Ray runs locally with ``ParallelConfig(backend="ray", num_cpus=2)`` (shards of 128 images), started once for all
sizes; its start-up and an untimed warm-up pass of the three stages on a 200-image pool (Ray workers up, imports
done) are reported separately. "dedup core" is ``find_duplicates`` alone on the same survivors, timed after the
stage (not part of the total): the growth of the duplicate search without the table work around it.

Peak RSS is sampled every 0.2 s in a background thread: this process alone, and this process plus all its
descendants (Ray's GCS, raylet, workers; shared pages such as Ray's object store are counted once per process). CPU
seconds (user + system of that process tree over each phase) are recorded too: on a shared machine they are steadier
than wall time.

Correctness per size: recall of the planted (copy, original) pairs, found when both land in one kept row's cluster
(the kept row and every row whose ``dup_of`` names it), by copy kind; pairwise precision of those clusters (a pair
is true when both come from one original); the share of defects rejected (and by their expected rule); clean
originals a content filter rejected.

Linearity: seconds per 1000 images per phase at each size, the ratio of the largest size's per-image time to the
smallest's (1.0 = linear), and a least-squares fit total = a + b*n with its residuals.

Baseline, on each same pool folder, in a subprocess with ``--imagededup-timeout`` seconds: imagededup's
``PHash().encode_images(image_dir=..., num_enc_workers=2)`` then ``find_duplicates(encoding_map=...,
max_distance_threshold=10, num_dist_workers=2)`` (its default threshold, of 64 bits, and default search: the
Cython brute force); wall and CPU time, images/s, peak RSS of its process tree, and recall/precision of its listed pairs
on the planted pairs (pairs, not clusters); "ours x imagededup" is our total images/s (three stages, artifacts included)
over its (hashing + search). After one timeout the larger sizes are skipped.

    python benchmarks/curation_scale.py [--sizes 10000 30000 100000] [--workdir DIR] [--keep-pool]
        [--imagededup-timeout 1200] [--imagededup-threshold 10] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import functools
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from krea2_core.curation.config import CurationConfig, DedupConfig, ParallelConfig
from krea2_core.world import render, sample_scene
from krea2_core.world.pool import DEFECTS as EXPECTED_REASON
from krea2_core.world.pool import content_defect

FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
FORMAT_SHARES = (0.7, 0.2, 0.1)
DUP_SHARE, DEFECT_SHARE = 0.10, 0.02
DUP_WINDOW = 20  # a copy of image k lands at k+1..k+20, inside every prefix that holds k+20
COPY_KINDS = ("exact", "reencode", "resize")
DEFECT_NAMES = ("noise", "overexposed", "underexposed", "flat", "letterbox", "frame")
MIN_LONG, MAX_LONG, MAX_ASPECT = 96, 1024, 2.5
MIN_RESIZED_SIDE = 48
GENERATOR_VERSION = 1  # bump when the generator changes: a kept pool of another version is generated again
STAGE = "256"
DUP_REASONS = ("exact_duplicate", "near_duplicate")
WARMUP_IMAGES = 200
CORES = 2
PHASES = ("ingest", "scoring", "selection")


@dataclass(frozen=True)
class Spec:
    """One pool file: what it is and how to make it."""

    index: int
    kind: str  # original | defect | exact | reencode | resize
    width: int
    height: int
    fmt: str
    quality: int
    source: str = ""  # file name of the original a copy is made from
    defect: str = ""

    @property
    def name(self) -> str:
        return f"{self.index:06d}{FORMATS[self.fmt]}"

    @property
    def group(self) -> int:
        """Ground-truth duplicate group: the original's index."""
        return int(self.source[:6]) if self.source else self.index


# ------------------------------------------------------------------------------------------ the pool


def _draw_look(rng: np.random.Generator) -> tuple[int, int, str, int]:
    long = round(math.exp(rng.uniform(math.log(MIN_LONG), math.log(MAX_LONG))))
    short = round(long / rng.uniform(1.0, MAX_ASPECT))
    width, height = (long, short) if rng.random() < 0.6 else (short, long)
    fmt = str(rng.choice(list(FORMATS), p=FORMAT_SHARES))
    return width, height, fmt, int(rng.integers(80, 96))


def _copy_spec(index: int, original: Spec, rng: np.random.Generator) -> Spec:
    kind = COPY_KINDS[int(rng.integers(len(COPY_KINDS)))]
    scale = rng.uniform(0.5, 0.8)
    if kind == "resize" and round(min(original.width, original.height) * scale) < MIN_RESIZED_SIDE:
        kind = "reencode"
    if kind == "exact":
        return Spec(index, kind, original.width, original.height, original.fmt, original.quality, original.name)
    if kind == "resize":
        return Spec(index, kind, round(original.width * scale), round(original.height * scale), original.fmt,
                    original.quality, original.name)
    if original.fmt == "JPEG":
        fmt = str(rng.choice(list(FORMATS), p=(0.5, 0.25, 0.25)))
        quality = int(rng.integers(55, 76)) if fmt == "JPEG" else int(rng.integers(80, 96))
    else:
        fmt, quality = "JPEG", int(rng.integers(80, 96))
    return Spec(index, kind, original.width, original.height, fmt, quality, original.name)


def plan_pool(n: int, seed: int) -> list[Spec]:
    """Every file of an n-image pool. Each index draws from its own seeded stream and copies only look back, so a
    shorter pool's plan is a prefix of a longer one's."""
    specs: list[Spec] = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        u = rng.random()
        recent = [s for s in specs[max(0, k - DUP_WINDOW):] if s.kind == "original"]
        if u < DUP_SHARE and recent:
            specs.append(_copy_spec(k, recent[int(rng.integers(len(recent)))], rng))
            continue
        width, height, fmt, quality = _draw_look(rng)
        if u < DUP_SHARE + DEFECT_SHARE:
            specs.append(Spec(k, "defect", width, height, fmt, quality,
                              defect=DEFECT_NAMES[int(rng.integers(len(DEFECT_NAMES)))]))
        else:
            specs.append(Spec(k, "original", width, height, fmt, quality))
    return specs


def _hue_rotation(angle: float) -> np.ndarray:
    """3x3 matrix rotating RGB colours about the grey axis (greys stay grey)."""
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)


def _scene(spec: Spec, rng: np.random.Generator) -> Image.Image:
    """A world scene at the spec's size, unlike every other one in the pool (see the module docstring)."""
    zoom = rng.uniform(1.0, 1.3)
    big_w, big_h = math.ceil(spec.width * zoom), math.ceil(spec.height * zoom)
    image = render(sample_scene(rng, big_w, big_h, max_shapes=int(rng.integers(1, 7))))
    x0, y0 = int(rng.integers(0, big_w - spec.width + 1)), int(rng.integers(0, big_h - spec.height + 1))
    image = image.crop((x0, y0, x0 + spec.width, y0 + spec.height))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = np.asarray(image, np.float32) @ _hue_rotation(rng.uniform(0, 2 * math.pi)).T.astype(np.float32)
    # lighting: a smooth random colour field from a 5x5 grid, +-50 levels; it is what makes the pHashes unlike
    grid = rng.normal(0, 50, (5, 5, 3)).astype(np.float32)
    pixels += np.stack([np.asarray(Image.fromarray(grid[..., c]).resize(image.size, Image.Resampling.BILINEAR))
                        for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({} if fmt == "PNG" else {"quality": quality}))
    return buffer.getvalue()


def make_file(spec: Spec, images: Path, seed: int) -> None:
    if spec.kind == "exact":
        data = (images / spec.source).read_bytes()
    elif spec.source:
        with Image.open(images / spec.source) as original:
            image = original.convert("RGB")
        if spec.kind == "resize":
            image = image.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
        data = _encode(image, spec.fmt, spec.quality)
    else:
        rng = np.random.default_rng([seed, spec.index, 1])
        image = _scene(spec, rng)
        if spec.defect:
            image = content_defect(spec.defect, rng, image)
        data = _encode(image, spec.fmt, spec.quality)
    (images / spec.name).write_bytes(data)


def ensure_pool(workdir: Path, specs: list[Spec], seed: int) -> dict[str, object]:
    """Generate the files of ``specs`` that ``workdir`` does not hold yet (originals first, then the copies that
    read them), in 2 processes."""
    images, meta_path = workdir / "images", workdir / "pool.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if (meta.get("seed"), meta.get("version")) != (seed, GENERATOR_VERSION):
        shutil.rmtree(images, ignore_errors=True)
        meta = {"seed": seed, "version": GENERATOR_VERSION, "images": 0, "seconds": 0.0}
    images.mkdir(parents=True, exist_ok=True)
    todo = specs[meta["images"]:]
    start = time.perf_counter()
    if todo:
        make = functools.partial(make_file, images=images, seed=seed)
        with ProcessPoolExecutor(CORES) as pool, tqdm(total=len(todo), desc="generate pool", unit="img") as bar:
            for batch in ([s for s in todo if not s.source], [s for s in todo if s.source]):
                for _ in pool.map(make, batch, chunksize=32):
                    bar.update()
        meta.update(images=len(specs), seconds=meta["seconds"] + time.perf_counter() - start)
        meta_path.write_text(json.dumps(meta))
    seconds = time.perf_counter() - start
    total_bytes = sum((images / s.name).stat().st_size for s in specs)
    return {"images": len(specs), "generated_now": len(todo), "seconds_now": seconds,
            "ms_per_image_2_processes": 1000 * seconds / len(todo) if todo else None,
            "generation_seconds_all_runs": meta["seconds"], "bytes": total_bytes,
            "kib_per_image": total_bytes / 1024 / len(specs),
            "kinds": dict(Counter(s.kind for s in specs)), "formats": dict(Counter(s.fmt for s in specs)),
            "defects": dict(Counter(s.defect for s in specs if s.defect))}


def link_pool(images: Path, specs: list[Spec], folder: Path) -> int:
    """A folder of hard links to ``specs``' files; returns their bytes."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for spec in specs:
        os.link(images / spec.name, folder / spec.name)
    return sum((images / s.name).stat().st_size for s in specs)


# ------------------------------------------------------------------------------------------ measuring


class ProcessTree:
    """A process and all its descendants: RSS (its own and the tree's) sampled every ``interval`` s in a thread, and
    the tree's CPU time on demand."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def sample(self) -> float:
        now = time.perf_counter()
        own = tree = 0
        for process in [self.process, *self._children()]:
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            own = rss if process is self.process else own
            tree += rss
        self.samples.append((now, own, tree))
        return now

    def cpu_seconds(self) -> float:
        """User + system seconds of the live tree (steadier than wall time on a shared machine)."""
        total = 0.0
        for process in [self.process, *self._children()]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def _children(self) -> list[psutil.Process]:
        try:
            return self.process.children(recursive=True)
        except psutil.Error:
            return []

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self, start: float, end: float) -> tuple[float, float]:
        """(own, tree) peak in MiB over the samples taken in [start, end]."""
        inside = [(own, tree) for t, own, tree in self.samples if start <= t <= end] or [(0, 0)]
        return max(o for o, _ in inside) / 2**20, max(t for _, t in inside) / 2**20


def _timed(tree: ProcessTree, phase: Callable[[], Path]) -> tuple[Path, dict[str, float]]:
    cpu = tree.cpu_seconds()
    start = tree.sample()
    result = phase()
    end = tree.sample()
    own, total = tree.peak_mib(start, end)
    return result, {"seconds": end - start, "cpu_seconds": tree.cpu_seconds() - cpu, "peak_rss_mib": own,
                    "peak_rss_tree_mib": total}


def run_stages(pool: Path, curation: CurationConfig, parallel: ParallelConfig, tree: ProcessTree
               ) -> tuple[dict[str, dict[str, float]], Path, Path]:
    """The three stages on ``pool``: each phase's wall and CPU seconds and peak RSS, and the scores and curated
    artifacts."""
    from krea2_core.data.stages import SelectionSettings, run_ingest, run_scoring, run_selection

    settings = SelectionSettings(stage=STAGE, filters=curation.stages[STAGE], dedup=curation.dedup)
    raw, ingest = _timed(tree, lambda: run_ingest({"source": pool}, None, parallel=parallel))
    scores, scoring = _timed(tree, lambda: run_scoring({"raw_pool": raw}, curation.analysis, parallel=parallel))
    curated, selection = _timed(tree, lambda: run_selection({"raw_pool": raw, "scores": scores}, settings))
    return {"ingest": ingest, "scoring": scoring, "selection": selection}, scores, curated


def dedup_core_seconds(verdicts: pd.DataFrame, scores: pd.DataFrame, dedup: DedupConfig) -> tuple[float, int]:
    """The duplicate search alone on the filter survivors, as ``select_stage`` runs it: (seconds, rows dropped)."""
    from krea2_core.data.curation import duplicates_among

    survivors = verdicts[verdicts["kept"] | verdicts["reason"].isin(DUP_REASONS)][["id", "source"]]
    kept = survivors.merge(scores, on="id", validate="one_to_one")
    start = time.perf_counter()
    decision = duplicates_among(kept, dedup)
    return time.perf_counter() - start, int((decision.dup_of >= 0).sum())


def pair_scores(pairs: set[tuple[int, int]], specs: list[Spec]) -> dict[str, object]:
    """Recall of the planted (copy, original) pairs, overall and by copy kind (and the first 100 missed), and the
    pairwise precision of ``pairs`` (i < j): true when both files come from one original."""
    copies = [s for s in specs if s.source]
    missed = [s for s in copies if (s.group, s.index) not in pairs]
    true_pairs = sum(specs[i].group == specs[j].group for i, j in pairs)
    return {"planted_pairs": len(copies), "recall": 1 - len(missed) / len(copies) if copies else float("nan"),
            "recall_by_kind": {k: 1 - sum(s.kind == k for s in missed) / n if (n := sum(s.kind == k for s in copies))
                               else float("nan") for k in COPY_KINDS},
            "missed": [{"file": s.name, "kind": s.kind, "of": s.source, "size": [s.width, s.height]}
                       for s in missed[:100]],
            "predicted_pairs": len(pairs), "precision": true_pairs / len(pairs) if pairs else 1.0,
            "false_pairs": len(pairs) - true_pairs}


def evaluate(verdicts: pd.DataFrame, specs: list[Spec]) -> dict[str, object]:
    index = np.array([int(Path(u).name[:6]) for u in verdicts["uri"]])
    of_id = dict(zip(verdicts["id"], index, strict=True))
    root = {i: of_id[d] if isinstance(d, str) else i for i, d in zip(index, verdicts["dup_of"], strict=True)}
    clusters: dict[int, list[int]] = {}
    for i, r in root.items():
        clusters.setdefault(r, []).append(i)
    pairs = {(min(a, b), max(a, b)) for members in clusters.values() for a in members for b in members if a < b}
    reasons = dict(zip(index, verdicts["reasons"].fillna(""), strict=True))
    first_reason = dict(zip(index, verdicts["reason"], strict=True))
    kept = dict(zip(index, verdicts["kept"], strict=True))
    defects = [s for s in specs if s.defect]
    filtered = [s for s in specs if s.kind == "original" and not kept[s.index]
                and first_reason[s.index] not in DUP_REASONS]
    return {**pair_scores(pairs, specs),
            "defects": len(defects),
            "defects_rejected": float(np.mean([not kept[s.index] for s in defects])) if defects else float("nan"),
            "defects_rejected_for_expected_rule": float(np.mean(
                [EXPECTED_REASON[s.defect] in reasons[s.index].split(",") for s in defects])) if defects else float("nan"),
            "missed_defects": [{"file": s.name, "defect": s.defect, "size": [s.width, s.height]}
                               for s in defects if kept[s.index]],
            "clean_originals_rejected_by_a_filter": len(filtered),
            "verdicts": {str(k): int(v) for k, v in verdicts["reason"].fillna("kept").value_counts().items()}}


# ------------------------------------------------------------------------------------------ imagededup


def imagededup_child(folder: Path, threshold: int, out: Path) -> None:
    phasher = _common.load_imagededup_hashing().PHash(verbose=False)
    start = time.perf_counter()
    encodings = phasher.encode_images(image_dir=folder, num_enc_workers=CORES)
    encoded = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=threshold,
                                        num_dist_workers=CORES)
    end = time.perf_counter()
    pairs = sorted({tuple(sorted((int(a[:6]), int(b[:6])))) for a, dups in found.items() for b in dups})
    out.write_text(json.dumps({"encode_seconds": encoded - start, "search_seconds": end - encoded,
                               "encoded": len(encodings), "pairs": pairs}))


def _children_cpu_seconds() -> float:
    """User + system seconds of this process's waited-for children and, through them, of theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_imagededup(folder: Path, threshold: int, timeout: float, specs: list[Spec]) -> dict[str, object]:
    """imagededup on ``folder`` in its own process group (killed whole at the timeout), its tree's RSS sampled."""
    out = folder.parent / f"{folder.name}.imagededup.json"
    log = folder.parent / f"{folder.name}.imagededup.log"
    command = [sys.executable, __file__, "--imagededup-child", str(folder),
               "--imagededup-threshold", str(threshold), "--imagededup-out", str(out)]
    cpu = _children_cpu_seconds()
    start = time.perf_counter()
    with log.open("w") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        watched = ProcessTree(child.pid)
        timed_out = False
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            watched.stop()
    wall = time.perf_counter() - start
    peak = watched.peak_mib(start, time.perf_counter())[1]
    cpu = _children_cpu_seconds() - cpu
    if timed_out or child.returncode != 0:
        why = f"did not finish in {timeout:g} s" if timed_out else \
            f"failed (exit {child.returncode}): {log.read_text()[-500:]}"
        return {"finished": False, "why": why, "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_tree_mib": peak}
    result = json.loads(out.read_text())
    seconds = result["encode_seconds"] + result["search_seconds"]
    return {"finished": True, "wall_seconds": wall, "seconds": seconds, "encode_seconds": result["encode_seconds"],
            "search_seconds": result["search_seconds"], "cpu_seconds": cpu, "images_per_s": len(specs) / seconds,
            "encoded": result["encoded"], "peak_rss_tree_mib": peak,
            **pair_scores({(a, b) for a, b in result["pairs"]}, specs)}


# ------------------------------------------------------------------------------------------ reporting


def linearity(sizes: list[int], results: list[dict]) -> dict[str, object]:
    seconds = {**{p: [r["phases"][p]["seconds"] for r in results] for p in PHASES},
               "total": [r["total_seconds"] for r in results], "total_cpu": [r["total_cpu_seconds"] for r in results],
               "dedup_core": [r["dedup_core_seconds"] for r in results]}
    per_1k = {p: [1000 * s / n for s, n in zip(v, sizes, strict=True)] for p, v in seconds.items()}
    report: dict[str, object] = {"seconds_per_1000": per_1k,
                                 "per_image_ratio_largest_to_smallest": {p: v[-1] / v[0] for p, v in per_1k.items()}}
    if len(sizes) >= 2:
        slope, intercept = np.polyfit(sizes, seconds["total"], 1)
        fitted = intercept + slope * np.array(sizes)
        residual = np.array(seconds["total"]) - fitted
        report["fit_total"] = {"a_seconds": float(intercept), "b_ms_per_image": 1000 * float(slope),
                               "residual_seconds": residual.tolist(), "residual_share": (residual / fitted).tolist()}
    return report


def print_tables(results: list[dict], lin: dict[str, object]) -> None:
    rows = []
    for r in results:
        p = r["phases"]
        rows.append([r["images"], p["ingest"]["seconds"], p["scoring"]["seconds"], p["selection"]["seconds"],
                     r["total_seconds"], r["total_cpu_seconds"], r["images_per_s"], r["images_per_s"] / CORES,
                     r["dedup_core_seconds"], *[1000 * p[k]["seconds"] / r["images"] for k in PHASES],
                     1000 * r["total_seconds"] / r["images"], 1000 * r["total_cpu_seconds"] / r["images"],
                     r["peak_rss_mib"], r["peak_rss_tree_mib"]])
    print(_common.markdown_table(
        ["images", "ingest s", "scoring s", "selection s", "total s", "total CPU s", "img/s", "img/s/core",
         "dedup core s", "ingest s/1k", "scoring s/1k", "selection s/1k", "total s/1k", "total CPU s/1k",
         "peak RSS MiB", "peak RSS tree MiB"], rows))
    print()
    print(_common.markdown_table(
        ["images", "planted pairs", "recall", "exact", "reencode", "resize", "cluster pairs", "precision",
         "defects rejected", "by expected rule", "clean originals filtered"],
        [[r["images"], r["ours"]["planted_pairs"], r["ours"]["recall"],
          *[r["ours"]["recall_by_kind"][k] for k in COPY_KINDS], r["ours"]["predicted_pairs"],
          r["ours"]["precision"], r["ours"]["defects_rejected"], r["ours"]["defects_rejected_for_expected_rule"],
          r["ours"]["clean_originals_rejected_by_a_filter"]] for r in results]))
    print()
    rows = []
    for r in results:
        d = r["imagededup"]
        if d.get("finished"):
            rows.append([r["images"], d["seconds"], d["encode_seconds"], d["search_seconds"], d["cpu_seconds"],
                         d["images_per_s"], d["peak_rss_tree_mib"], d["recall"], d["precision"],
                         r["images_per_s"] / d["images_per_s"]])
        else:
            rows.append([r["images"], d["why"], "", "", "", "", d.get("peak_rss_tree_mib", ""), "", "", ""])
    print(_common.markdown_table(["images", "imagededup s", "encode s", "find_duplicates s", "CPU s", "img/s",
                                  "peak RSS tree MiB", "recall", "pair precision", "ours x imagededup"], rows))
    print()
    ratios = ", ".join(f"{p} {v:.2f}" for p, v in lin["per_image_ratio_largest_to_smallest"].items())
    print(f"per-image time, largest size / smallest (1.00 = linear): {ratios}")
    if "fit_total" in lin:
        fit = lin["fit_total"]
        print(f"fit total = {fit['a_seconds']:.1f} s + {fit['b_ms_per_image']:.2f} ms * n; residuals "
              + ", ".join(f"{s:+.1f} s ({100 * f:+.1f}%)" for s, f in zip(fit["residual_seconds"],
                                                                            fit["residual_share"], strict=True)))


# ------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="pool sizes")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the pool and the scratch output root go (default: a new temp dir)")
    parser.add_argument("--keep-pool", action="store_true", help="keep the generated pool in --workdir for a rerun")
    parser.add_argument("--imagededup-timeout", type=float, default=1200, help="seconds per size; 0 skips imagededup")
    parser.add_argument("--imagededup-threshold", type=int, default=10, help="max_distance_threshold, of 64 bits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=_common.RESULTS_DIR / "curation_scale.json")
    parser.add_argument("--imagededup-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--imagededup-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(n < 1 for n in args.sizes):
        parser.error(f"--sizes must be positive, got {args.sizes}")
    if any(b <= a for a, b in zip(args.sizes, args.sizes[1:], strict=False)):
        parser.error(f"--sizes must be strictly increasing, got {args.sizes}")
    if args.imagededup_timeout < 0:
        parser.error(f"--imagededup-timeout must be >= 0, got {args.imagededup_timeout:g}")
    if not 0 <= args.imagededup_threshold <= 64:
        parser.error(f"--imagededup-threshold must be in [0, 64], got {args.imagededup_threshold}")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} is not a directory")
    return args


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    # imported here, not at the top (3 s): a bad argument is refused at once
    import ray

    from krea2_core.data.stages import SCORES_FILE, VERDICTS_FILE
    from krea2_core.presets import preset
    from krea2_core.ray_map import ensure_ray

    specs = plan_pool(args.sizes[-1], args.seed)
    generation = ensure_pool(workdir, specs, args.seed)
    print(f"pool: {len(specs)} images, {generation['bytes'] / 2**30:.2f} GiB ({generation['kib_per_image']:.0f} "
          f"KiB/image); generated now {generation['generated_now']} in {generation['seconds_now']:.0f} s; "
          f"kinds {generation['kinds']}, formats {generation['formats']}")
    folders = {n: workdir / "pools" / f"n{n}" for n in args.sizes}
    pool_bytes = {n: link_pool(workdir / "images", specs[:n], folder) for n, folder in folders.items()}
    warmup = workdir / "pools" / "warmup"
    link_pool(workdir / "images", specs[:WARMUP_IMAGES], warmup)

    # the stages publish under a scratch output root with its own sqlite MLflow store
    shutil.rmtree(workdir / "outputs", ignore_errors=True)
    os.environ["KREA2_OUTPUT_ROOT"] = str(workdir / "outputs")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    curation = preset("tiny").curation
    parallel = ParallelConfig(backend="ray", num_cpus=CORES)
    tree = ProcessTree(os.getpid())
    start = time.perf_counter()
    ensure_ray(parallel)
    ray_start = time.perf_counter() - start
    run_stages(warmup, curation, parallel, tree)
    warmup_seconds = time.perf_counter() - start - ray_start

    results: list[dict] = []
    imagededup_stopped = ""
    for n, folder in folders.items():
        print(f"\n=== {n} images")
        phases, scores_dir, curated = run_stages(folder, curation, parallel, tree)
        total = sum(p["seconds"] for p in phases.values())
        verdicts = pd.read_parquet(curated / VERDICTS_FILE)
        core_seconds, core_dropped = dedup_core_seconds(verdicts, pd.read_parquet(scores_dir / SCORES_FILE),
                                                        curation.dedup)
        if core_dropped != int(verdicts["reason"].isin(DUP_REASONS).sum()):
            raise RuntimeError("find_duplicates alone drops another number of rows than the selection stage")
        result = {"images": n, "pool_bytes": pool_bytes[n], "phases": phases, "total_seconds": total,
                  "total_cpu_seconds": sum(p["cpu_seconds"] for p in phases.values()),
                  "images_per_s": n / total, "dedup_core_seconds": core_seconds,
                  "peak_rss_mib": max(p["peak_rss_mib"] for p in phases.values()),
                  "peak_rss_tree_mib": max(p["peak_rss_tree_mib"] for p in phases.values()),
                  "ours": evaluate(verdicts, specs[:n])}
        print(f"ours: {total:.1f} s, {n / total:.1f} img/s, recall {result['ours']['recall']:.3f}, "
              f"precision {result['ours']['precision']:.3f}")
        if args.imagededup_timeout == 0:
            result["imagededup"] = {"finished": False, "why": "skipped (--imagededup-timeout 0)"}
        elif imagededup_stopped:
            result["imagededup"] = {"finished": False, "why": f"skipped: {imagededup_stopped}"}
        else:
            result["imagededup"] = run_imagededup(folder, args.imagededup_threshold, args.imagededup_timeout,
                                                  specs[:n])
            if not result["imagededup"]["finished"]:
                imagededup_stopped = f"{result['imagededup']['why']} at {n} images"
            else:
                print(f"imagededup: {result['imagededup']['seconds']:.1f} s")
        results.append(result)
    tree.stop()
    ray.shutdown()

    lin = linearity(args.sizes, results)
    print()
    print_tables(results, lin)
    return {"benchmark": "curation_scale",
            "settings": {"sizes": args.sizes, "seed": args.seed, "imagededup_threshold": args.imagededup_threshold,
                         "imagededup_timeout_s": args.imagededup_timeout, "stage": STAGE,
                         "filters": vars(curation.stages[STAGE]), "dedup": vars(curation.dedup),
                         "analysis": vars(curation.analysis), "parallel": vars(parallel),
                         "pool": {"duplicate_share": DUP_SHARE, "defect_share": DEFECT_SHARE,
                                  "duplicate_window": DUP_WINDOW, "long_side": [MIN_LONG, MAX_LONG],
                                  "max_aspect": MAX_ASPECT, "format_shares": dict(zip(FORMATS, FORMAT_SHARES,
                                                                                      strict=True)),
                                  "generator_version": GENERATOR_VERSION}},
            "environment": {"ray": ray.__version__, "ray_start_seconds": ray_start,
                            "warmup_seconds": warmup_seconds, "warmup_images": WARMUP_IMAGES},
            "generation": generation, "results": results, "linearity": lin}


def main() -> None:
    args = parse_args()
    if args.imagededup_child:
        imagededup_child(args.imagededup_child, args.imagededup_threshold, args.imagededup_out)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="krea2-curation-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        payload = measure(args, workdir)
    finally:
        for scratch in ("outputs", "pools"):
            shutil.rmtree(workdir / scratch, ignore_errors=True)
        if not args.keep_pool:
            shutil.rmtree(workdir / "images", ignore_errors=True)
            (workdir / "pool.json").unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    path = _common.write_json(str(args.json), payload)
    print(f"\nwrote {path}" + (f"; pool kept in {workdir}" if args.keep_pool else ""))


if __name__ == "__main__":
    main()
