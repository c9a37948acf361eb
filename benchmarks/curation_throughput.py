"""Per-core image scoring throughput: krea2's ``score_image`` vs imagededup PHash vs a PIL+imagehash loop.

Every method runs in this one process, on one thread (numeric libraries are pinned to one thread
before numpy is imported), over the same files, starting from a file path each time:

* ours        ``score_image(path.read_bytes(), AnalysisConfig())``: reduced-size decode, all filter
              scores (pixel correlation, entropy, white/black ratio, flat border), md5, 12x12 pHash, colorhash;
* imagededup  ``PHash().encode_image(image_file=path)``: its per-file API (PIL open, convert to RGB,
              LANCZOS resize of the full image to 32x32, grey, DCT -> 8x8 pHash); no filters, no md5,
              no colour hash;
* pil+imagehash  the obvious way to get our hashes: read bytes, md5, ``Image.open(...).convert("RGB")``,
              ``imagehash.phash(img, hash_size=12)``, ``imagehash.colorhash(img, binbits=5)``; no filters.

A fourth row, "read + decode only", is a floor, not a method: reading the file and decoding it as cheaply as
scoring does (JPEG DCT-scaled as far as the analysis copy's size allows; a plain PNG through libspng, at full size:
PNG has no reduced decode) with no other work.

Image set: the real photos from ``real_image_files(["skimage", "/usr/share/backgrounds"])`` (JPEG and
PNG, many 1920px+ wallpapers) plus ``--n-scenes`` world scenes rendered at 512-1536 px, saved ~70% JPEG
(quality 90) / 30% PNG, all written to a temp dir. One untimed warm-up pass per method, then
``--repeats`` timed passes (methods interleaved pass by pass); the best pass is reported.

    python benchmarks/curation_throughput.py [--n-scenes 230] [--repeats 2]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import hashlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from krea2_core.curation.config import AnalysisConfig
from krea2_core.data.curation import score_image
from krea2_core.data.images import reduced_decode
from krea2_core.world import render, sample_scene
from krea2_core.world.pool import real_image_files

REAL_DIRS = ["skimage", "/usr/share/backgrounds"]
FORMATS = ("JPEG", "PNG")


def build_image_set(out: Path, n_scenes: int, seed: int) -> list[tuple[Path, str]]:
    """(path, format) of every benchmark image, shuffled so formats and sizes interleave."""
    rng = np.random.default_rng(seed)
    files: list[tuple[Path, str]] = []
    for k, src in enumerate(real_image_files(REAL_DIRS, 1000)):
        dst = out / f"real_{k:04d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        with Image.open(dst) as im:
            files.append((dst, im.format))
    for k in range(n_scenes):
        long_side = int(rng.integers(512, 1537))
        short_side = int(long_side / rng.uniform(1.0, 1.8))
        width, height = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        image = render(sample_scene(rng, width, height))
        fmt = "JPEG" if rng.random() < 0.7 else "PNG"
        dst = out / f"scene_{k:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        image.save(dst, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files.append((dst, fmt))
    order = rng.permutation(len(files))
    return [files[i] for i in order]


def make_methods() -> dict[str, Callable[[Path], object]]:
    config = AnalysisConfig()
    phasher = _common.load_imagededup_hashing().PHash(verbose=False)

    def ours(path: Path) -> object:
        return score_image(path.read_bytes(), config)

    def imagededup_phash(path: Path) -> object:
        return phasher.encode_image(image_file=path)

    def pil_imagehash(path: Path) -> object:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return (hashlib.md5(data, usedforsecurity=False).hexdigest(), imagehash.phash(image, hash_size=12),
                imagehash.colorhash(image, binbits=5))

    def decode_only(path: Path) -> object:
        # floor for any method that looks at pixels: read + the least decode, nothing else (libspng for a plain PNG,
        # a JPEG DCT-scaled as far as the analysis copy's size allows, Pillow's full decode for the rest)
        data = path.read_bytes()
        return reduced_decode(data, Image.open(io.BytesIO(data)), config.side).size

    return {"ours (score_image)": ours, "imagededup PHash": imagededup_phash, "PIL + imagehash": pil_imagehash,
            "reference: read + decode only": decode_only}


def timed_pass(fn: Callable[[Path], object], files: list[tuple[Path, str]]) -> np.ndarray:
    seconds = np.empty(len(files))
    for k, (path, _) in enumerate(files):
        start = time.perf_counter()
        result = fn(path)
        seconds[k] = time.perf_counter() - start
        if result is None or (isinstance(result, dict) and result.get("error_reason")):
            raise RuntimeError(f"{fn.__name__} failed on {path}: {result}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-scenes", type=int, default=230, help="world scenes added to the real photos")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per method (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    methods = make_methods()
    with tempfile.TemporaryDirectory(prefix="krea2-throughput-") as tmp:
        t0 = time.perf_counter()
        files = build_image_set(Path(tmp), args.n_scenes, args.seed)
        build_s = time.perf_counter() - t0
        formats = np.array([fmt for _, fmt in files])
        sizes = [p.stat().st_size for p, _ in files]
        pixels = []
        for p, _ in files:
            with Image.open(p) as im:
                pixels.append(im.width * im.height)
        print(f"image set: {len(files)} files ({', '.join(f'{(formats == f).sum()} {f}' for f in FORMATS)}), "
              f"{sum(sizes) / 2**20:.0f} MiB, median {np.median(pixels) / 1e6:.2f} MP, "
              f"max {max(pixels) / 1e6:.1f} MP; built in {build_s:.0f}s")

        for fn in methods.values():  # warm-up: imports, caches, page cache
            timed_pass(fn, files)
        passes: dict[str, list[np.ndarray]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                passes[name].append(timed_pass(fn, files))

    subsets = {"all": np.ones(len(files), bool), **{f: formats == f for f in FORMATS}}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, runs in passes.items():
        results[name] = {}
        for subset, mask in subsets.items():
            best = min(float(run[mask].sum()) for run in runs)
            results[name][subset] = {"images": int(mask.sum()), "seconds": best,
                                     "images_per_s_per_core": float(mask.sum()) / best,
                                     "ms_per_image": 1000 * best / max(int(mask.sum()), 1)}
    baseline, floor = "imagededup PHash", "reference: read + decode only"
    for name in results:
        for subset in subsets:
            results[name][subset]["ratio_vs_imagededup"] = (
                results[name][subset]["images_per_s_per_core"] / results[baseline][subset]["images_per_s_per_core"])
            results[name][subset]["share_of_decode_floor"] = (
                results[name][subset]["images_per_s_per_core"] / results[floor][subset]["images_per_s_per_core"])

    headers = ["method", *[f"{s} img/s/core" for s in subsets], *[f"{s} x imagededup" for s in subsets],
               *[f"{s} share of floor" for s in subsets]]
    rows = [[name, *[results[name][s]["images_per_s_per_core"] for s in subsets],
             *[results[name][s]["ratio_vs_imagededup"] for s in subsets],
             *[results[name][s]["share_of_decode_floor"] for s in subsets]] for name in results]
    print()
    print(f"best of {args.repeats} passes, 1 thread, {len(files)} images "
          f"({subsets['JPEG'].sum()} JPEG / {subsets['PNG'].sum()} PNG)")
    print(_common.markdown_table(headers, rows))

    path = _common.write_json("curation_throughput.json", {
        "benchmark": "curation_throughput",
        "settings": {"n_scenes": args.n_scenes, "repeats": args.repeats, "seed": args.seed,
                     "real_image_dirs": REAL_DIRS, "analysis_config": AnalysisConfig().to_dict()
                     if hasattr(AnalysisConfig(), "to_dict") else repr(AnalysisConfig())},
        "image_set": {"files": len(files), **{f: int((formats == f).sum()) for f in FORMATS},
                      "total_mib": sum(sizes) / 2**20, "median_megapixels": float(np.median(pixels)) / 1e6,
                      "max_megapixels": max(pixels) / 1e6, "build_seconds": build_s},
        "results": results,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
