"""Near-duplicate precision/recall on a generated transform set: krea2 dedup vs imagededup PHash.

Originals: ``--n-scenes`` world scenes (160-512 px, ~70% JPEG q90 / 30% PNG) plus the real photos of
``real_image_files(["skimage", "/usr/share/backgrounds"])`` (converted to RGB, alpha on white, and
downscaled to at most ``--real-max-side`` px so the set builds in seconds; same format as the file).
For every original, copies by transform:

* reencode / resize / recolor: ``krea2_core.world.pool.near_copy`` (JPEG q55-75; 60-85% scale;
  +4-10% brightness and -5-15% saturation);
* crop_0.5% / crop_1% / crop_2% / crop_5%: that fraction cut from EACH side, saved JPEG q92.

Originals that break a content filter (default ``StageFilters`` thresholds: white/black pixels, low
entropy, extreme texture, flat border, aspect) are left out and listed: dedup only ever sees filter
survivors, and several MATE overlay wallpapers are almost fully transparent, i.e. blank white once
composited, so they would otherwise "merge" with each other.

Hard negatives: for every world scene one ``recolored`` colour variant (same layout, every shape in
another colour; PNG). It is a DIFFERENT image and must not be grouped with its source or its copies.

Ground truth (pairwise): an original and all its copies are mutual duplicates; every other pair is a
non-duplicate. The three ``Elephants*.jpg`` wallpapers (one picture at three resolutions) are one
original group. Other look-alike real files (the Ubuntu-MATE colour variants, the motorcycle stereo
pair, MATE-Stripes dark/light, chessboard grey/RGB) are different images, so pairing them counts as
a false positive; the JSON lists every false pair between real originals by name.

Methods:

* ours: ``score_image`` hashes (12x12 pHash + 5-bit colorhash) -> ``find_duplicates`` with the default
  ``DedupConfig()`` (pHash <= 16 of 144 bits AND colorhash <= 5 of 70 bits). Three readings:
  "clusters" = every pair inside a kept row's cluster (the kept row and all rows whose ``dup_of``
  names it: what the pipeline keeps/drops together; the headline); "threshold pairs" = every pair
  within both thresholds (the candidate graph; same reading as imagededup's pair lists); "edges" =
  only the (dropped, dup_of) pairs (low recall by construction: two copies of one original are never
  an edge). Ablation: the same pHash threshold without the colorhash check (clusters).
* imagededup: ``PHash().encode_image(image_file=path)`` (8x8 pHash) then
  ``PHash().find_duplicates(encoding_map=..., max_distance_threshold=T)`` for each ``--thresholds``
  (10 is its default); predicted pairs = every (file, listed duplicate). Search method ``bktree``
  (exact, same result as brute force; the package's default Cython brute force is not compiled in
  this install), one process.

Per-transform recall = share of (copy, its original) pairs the method puts together.

    python benchmarks/near_duplicates.py [--n-scenes 150] [--thresholds 10,6]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import io
import re
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from krea2_core.curation.config import AnalysisConfig, DedupConfig, StageFilters
from krea2_core.data import hashing
from krea2_core.data.curation import FILTER_RULES, rule_failures, score_image
from krea2_core.data.dedup import find_duplicates, keep_order, near_pairs
from krea2_core.world import render, sample_scene
from krea2_core.world.pool import near_copy, recolored, real_image_files

REAL_DIRS = ["skimage", "/usr/share/backgrounds"]
CROPS = (0.005, 0.01, 0.02, 0.05)
ANALYSIS = AnalysisConfig()
FILTERS = StageFilters(min_side=1)  # the content thresholds; resolution is not what this benchmark is about
TRANSFORMS = ("reencode", "resize", "recolor", *[f"crop_{100 * f:g}%" for f in CROPS])


@dataclass
class Item:
    path: Path
    group: int  # ground-truth duplicate group (the original's index); colour variants get their own
    kind: str  # "original", a transform name, or "color_variant"
    source: str  # "world" or "real"
    original: int  # item index of the original this item derives from (itself for originals)
    name: str = ""  # source file name of a real original


def _save(image: Image.Image, path: Path, fmt: str, quality: int = 90) -> None:
    image.save(path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _crop(image: Image.Image, fraction: float) -> bytes:
    w, h = image.size
    dx, dy = max(1, round(w * fraction)), max(1, round(h * fraction))
    buffer = io.BytesIO()
    image.crop((dx, dy, w - dx, h - dy)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _real_group_key(path: Path) -> str:
    """One picture at several resolutions (Elephants.jpg, Elephants_3840x2160.jpg, ...) or in grey and
    RGB (chessboard_GRAY.png, chessboard_RGB.png) -> one key."""
    return re.sub(r"(_\d+x\d+|_GRAY|_RGB)$", "", path.stem)


def _filter_failures(row: dict[str, object]) -> list[str]:
    """The content filters (default ``StageFilters`` thresholds) an image breaks. Dedup only ever sees
    images that pass them, so originals that fail (e.g. mostly transparent overlay wallpapers, blank
    white once composited on white) are left out of the set instead of scoring as false merges."""
    if row["error_reason"]:
        return [str(row["error_reason"])]
    broken = rule_failures(pd.DataFrame([row]), FILTERS).iloc[0]
    return [rule for rule in FILTER_RULES if broken[rule]]


def build_set(out: Path, n_scenes: int, real_max_side: int, seed: int) -> tuple[list[Item], list[dict[str, object]]]:
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    excluded: list[dict[str, object]] = []
    group_of_key: dict[str, int] = {}
    next_group = 0

    def add_original(image: Image.Image, fmt: str, source: str, key: str, name: str) -> bool:
        nonlocal next_group
        index = len(items)
        path = out / f"{index:05d}_original.{'jpg' if fmt == 'JPEG' else 'png'}"
        _save(image, path, fmt)
        broken = _filter_failures(score_image(path.read_bytes(), ANALYSIS))
        if broken:
            excluded.append({"name": name, "source": source, "fails": broken})
            path.unlink()
            return False
        if key not in group_of_key:
            group_of_key[key] = next_group
            next_group += 1
        group = group_of_key[key]
        items.append(Item(path, group, "original", source, index, name))
        for transform in TRANSFORMS:
            if transform.startswith("crop_"):
                data = _crop(image, float(transform[5:-1]) / 100)
            else:
                data = near_copy(transform, rng, image)
            path = out / f"{len(items):05d}_{transform}.jpg"
            path.write_bytes(data)
            items.append(Item(path, group, transform, source, index))
        return True

    variants = []
    for k in range(n_scenes):
        long_side = int(rng.integers(160, 513))
        short_side = int(long_side / rng.uniform(1.0, 1.8))
        width, height = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        scene = sample_scene(rng, width, height)
        fmt = "JPEG" if rng.random() < 0.7 else "PNG"
        original_index = len(items)
        if add_original(render(scene), fmt, "world", f"scene{k}", f"scene{k}"):
            variants.append((original_index, render(recolored(scene, rng))))
    for original_index, image in variants:
        path = out / f"{len(items):05d}_color_variant.png"
        _save(image, path, "PNG")
        items.append(Item(path, next_group, "color_variant", "world", original_index))
        next_group += 1
    for src in real_image_files(REAL_DIRS, 1000):
        with Image.open(src) as im:
            fmt = im.format if im.format in ("JPEG", "PNG") else "PNG"
            image = _rgb(im)
        image.thumbnail((real_max_side, real_max_side), Image.Resampling.LANCZOS)
        add_original(image, fmt, "real", "real:" + _real_group_key(src), src.name)
    return items, excluded


# ---------------------------------------------------------------------------------------- methods


def ours(items: list[Item]) -> tuple[list[dict], float]:
    """score_image rows of every item, and the scoring seconds."""
    config = AnalysisConfig()
    start = time.perf_counter()
    rows = [score_image(item.path.read_bytes(), config) for item in items]
    seconds = time.perf_counter() - start
    bad = [(item.path.name, r["error_reason"]) for item, r in zip(items, rows, strict=True) if r["error_reason"]]
    if bad:
        raise RuntimeError(f"score_image failed: {bad[:5]}")
    return rows, seconds


def ours_decide(rows: list[dict], max_colorhash_distance: int) -> np.ndarray:
    decision = find_duplicates(
        md5=np.array([r["md5"] for r in rows]),
        phash_codes=hashing.codes([r["phash"] for r in rows]),
        colorhash_codes=hashing.codes([r["colorhash"] for r in rows]),
        order=keep_order(np.array([r["width"] * r["height"] for r in rows], np.int64),
                         np.array([r["n_bytes"] for r in rows], np.int64), np.arange(len(rows))),
        max_phash_distance=DedupConfig().max_phash_distance,
        max_colorhash_distance=max_colorhash_distance,
    )
    return decision.dup_of


def threshold_pairs(rows: list[dict], max_colorhash_distance: int) -> set[tuple[int, int]]:
    """Every pair within both thresholds: the candidate graph find_duplicates starts from (the same
    reading as imagededup's pair lists)."""
    phash_codes = hashing.codes([r["phash"] for r in rows])
    colorhash_codes = hashing.codes([r["colorhash"] for r in rows])
    i, j = near_pairs(phash_codes, DedupConfig().max_phash_distance)
    close = hashing.hamming(colorhash_codes[i], colorhash_codes[j]) <= max_colorhash_distance
    return set(zip(i[close].tolist(), j[close].tolist(), strict=True))


def cluster_pairs(dup_of: np.ndarray) -> set[tuple[int, int]]:
    members: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(dup_of):
        members[int(d) if d >= 0 else i].append(i)
    return {(a, b) for group in members.values() for a in group for b in group if a < b}


def edge_pairs(dup_of: np.ndarray) -> set[tuple[int, int]]:
    return {(min(i, int(d)), max(i, int(d))) for i, d in enumerate(dup_of) if d >= 0}


def imagededup_pairs(encodings: dict[str, str], names: dict[str, int], threshold: int, phasher) -> set[tuple[int, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "num_enc_workers has no effect" when passing encodings
        found = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=threshold,
                                        search_method="bktree", num_dist_workers=0)
    return {(min(names[a], names[b]), max(names[a], names[b])) for a, dups in found.items() for b in dups}


# ---------------------------------------------------------------------------------------- metrics


def evaluate(items: list[Item], predicted: set[tuple[int, int]]) -> dict[str, object]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.group].append(i)
    truth = {(a, b) for g in groups.values() for a in g for b in g if a < b}
    hits = predicted & truth
    result: dict[str, object] = {
        "predicted_pairs": len(predicted), "true_pairs": len(truth), "correct_pairs": len(hits),
        "precision": len(hits) / len(predicted) if predicted else 1.0,
        "recall": len(hits) / len(truth) if truth else 1.0,
    }
    recall_by: dict[str, dict[str, float]] = {}
    for transform in TRANSFORMS:
        for source in ("all", "world", "real"):
            copies = [i for i, it in enumerate(items) if it.kind == transform and source in ("all", it.source)]
            found = sum((min(i, items[i].original), max(i, items[i].original)) in predicted for i in copies)
            recall_by.setdefault(transform, {})[source] = found / len(copies) if copies else float("nan")
    result["recall_by_transform"] = recall_by

    # colour variants: merged with its source original, or with any member of the source's group
    variant_ids = [i for i, it in enumerate(items) if it.kind == "color_variant"]
    with_original = with_group = 0
    for v in variant_ids:
        source = items[v].original
        pairs_to_group = [(min(v, j), max(v, j)) for j in groups[items[source].group]]
        with_original += (min(v, source), max(v, source)) in predicted
        with_group += any(p in predicted for p in pairs_to_group)
    result["color_variant_merged_with_original"] = with_original / len(variant_ids) if variant_ids else 0.0
    result["color_variant_merged_with_any_copy"] = with_group / len(variant_ids) if variant_ids else 0.0

    false_pairs = predicted - truth
    kinds: dict[str, int] = defaultdict(int)
    real_false = []
    for a, b in sorted(false_pairs):
        ia, ib = items[a], items[b]
        if "color_variant" in (ia.kind, ib.kind):
            src_group = items[(ia if ia.kind == "color_variant" else ib).original].group
            other = ib if ia.kind == "color_variant" else ia
            kinds["color_variant_vs_its_source" if other.group == src_group else "color_variant_vs_other"] += 1
        elif ia.source == ib.source == "real":
            kinds["real_vs_other_real"] += 1
            if ia.kind == ib.kind == "original":
                real_false.append(sorted([ia.name, ib.name]))
        elif ia.source == ib.source == "world":
            kinds["world_vs_other_world"] += 1
        else:
            kinds["world_vs_real"] += 1
    result["false_pairs_by_kind"] = dict(kinds)
    result["false_pairs_between_real_originals"] = real_false
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-scenes", type=int, default=150, help="world scene originals")
    parser.add_argument("--real-max-side", type=int, default=1024, help="real photos are downscaled to this")
    parser.add_argument("--thresholds", default="10,6", help="imagededup max_distance_threshold values")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]

    phasher = _common.load_imagededup_hashing().PHash(verbose=False)
    with tempfile.TemporaryDirectory(prefix="krea2-neardup-") as tmp:
        t0 = time.perf_counter()
        items, excluded = build_set(Path(tmp), args.n_scenes, args.real_max_side, args.seed)
        build_s = time.perf_counter() - t0
        counts = defaultdict(int)
        for it in items:
            counts[it.kind] += 1
        n_originals = counts["original"]
        print(f"set: {len(items)} images = {n_originals} originals "
              f"({sum(it.source == 'real' and it.kind == 'original' for it in items)} real) x "
              f"(1 + {len(TRANSFORMS)} copies) + {counts['color_variant']} colour variants; built in {build_s:.0f}s")

        print(f"left out {len(excluded)} originals that fail the content filters: "
              + ", ".join(f"{e['name']} ({'/'.join(e['fails'])})" for e in excluded))
        rows, ours_s = ours(items)
        start = time.perf_counter()
        names = {it.path.name: i for i, it in enumerate(items)}
        encodings = {it.path.name: phasher.encode_image(image_file=it.path) for it in items}
        dedup_encode_s = time.perf_counter() - start
        if any(v is None for v in encodings.values()):
            raise RuntimeError("imagededup failed to hash some files")

    default = DedupConfig()
    dup_of = ours_decide(rows, default.max_colorhash_distance)
    dup_of_phash_only = ours_decide(rows, AnalysisConfig().colorhash_bits)
    methods: dict[str, set[tuple[int, int]]] = {
        f"ours: pHash12<={default.max_phash_distance} & colorhash<={default.max_colorhash_distance} (clusters)":
            cluster_pairs(dup_of),
        "ours: same (threshold pairs)": threshold_pairs(rows, default.max_colorhash_distance),
        "ours: same (edges dropped->dup_of only)": edge_pairs(dup_of),
        f"ours ablation: pHash12<={default.max_phash_distance}, no colorhash (clusters)": cluster_pairs(dup_of_phash_only),
    }
    for t in thresholds:
        methods[f"imagededup PHash8 T={t}{' (default)' if t == 10 else ''} (pairs)"] = imagededup_pairs(
            encodings, names, t, phasher)
    results = {name: evaluate(items, pairs) for name, pairs in methods.items()}
    # which copy the keep rule (most pixels, then largest file) keeps: same-pixel copies saved at a
    # higher JPEG quality than the original (recolor: q92) outrank it
    originals = [i for i, it in enumerate(items) if it.kind == "original"]
    kept_kind: dict[str, int] = defaultdict(int)
    for i in originals:
        kept = i if dup_of[i] < 0 else int(dup_of[i])
        kept_kind[items[kept].kind] += 1
    print(f"ours: row kept for each original's cluster, by kind: {dict(kept_kind)}")

    headers = ["method", "precision", "recall", *TRANSFORMS, "colour variant merged"]
    table = [[name, r["precision"], r["recall"], *[r["recall_by_transform"][t]["all"] for t in TRANSFORMS],
              r["color_variant_merged_with_any_copy"]] for name, r in results.items()]
    print()
    print(_common.markdown_table(headers, table, caption=(
        "pairwise precision / recall; per-transform columns = recall of (copy, original) pairs; "
        "colour variant merged = share of variants put with their source or any of its copies")))
    print()
    print(_common.markdown_table(
        ["method", *[f"{t} world/real" for t in TRANSFORMS]],
        [[name, *[f"{r['recall_by_transform'][t]['world']:.2f}/{r['recall_by_transform'][t]['real']:.2f}"
                  for t in TRANSFORMS]] for name, r in results.items()],
        caption="recall by transform, world scenes vs real photos"))
    print()
    for name, r in results.items():
        print(f"false pairs, {name}: {r['false_pairs_by_kind'] or 'none'}")
        if r["false_pairs_between_real_originals"]:
            print(f"    real originals paired: {r['false_pairs_between_real_originals']}")

    path = _common.write_json("near_duplicates.json", {
        "benchmark": "near_duplicates",
        "settings": {"n_scenes": args.n_scenes, "real_max_side": args.real_max_side, "thresholds": thresholds,
                     "seed": args.seed, "transforms": list(TRANSFORMS), "real_image_dirs": REAL_DIRS,
                     "dedup_config": {"max_phash_distance": default.max_phash_distance,
                                      "max_colorhash_distance": default.max_colorhash_distance},
                     "ours_pairs": "clusters = all pairs within each kept row's cluster (kept row + rows whose "
                                   "dup_of names it); threshold pairs = every pair within both thresholds; "
                                   "edges = (dropped, dup_of) pairs only",
                     "imagededup_pairs": "every (file, duplicate) listed by PHash.find_duplicates; bktree search"},
        "image_set": {"images": len(items), **dict(counts), "build_seconds": build_s,
                      "excluded_originals_failing_filters": excluded},
        "hashing_seconds": {"ours_score_image": ours_s, "imagededup_encode_image": dedup_encode_s},
        "results": results,
        "ours_kept_row_kind_per_original": dict(kept_kind),
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
