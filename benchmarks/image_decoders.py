"""Per-format decode speed of every decoder that installs here, against Pillow: the floor under curation's scoring.

Each decoder turns the file's bytes (already in memory) into pixels at the analysis scale, one thread, per format:

* ``decode``: the least a decoder must do before any filter can look at the image: JPEG at the smallest DCT scale
  whose long side is still >= ``--side`` (and, as a row of its own, Pillow asked for a side x side box) (libjpeg-turbo's scaled IDCT: Pillow's ``draft``, simplejpeg's
  ``min_width``/``min_height``, pyvips' ``shrink``, OpenCV's ``IMREAD_REDUCED_*``); WebP at its own scaled decode
  where the decoder has one (pyvips ``scale``); PNG at full size (the format has no reduced decode).
* ``copy``: ``decode`` and then a shrink to long side ``--side``: what curation's analysis copy is. pyvips does both in
  ``thumbnail_buffer`` (shrink-on-load); the others decode and then shrink with Pillow's ``thumbnail``, as curation
  does (``krea2_core.data.images.analysis_copy``).

Image set: the real photos and world scenes of ``curation_throughput.py`` (same seed, JPEG and PNG) plus the first
``--n-webp`` scenes re-encoded as WebP (quality 90). A decoder that fails on a file counts the file's time and is
reported with its number of failures (a fast decoder that cannot read the pool is no floor). Methods interleave,
one untimed warm-up pass, then ``--repeats`` passes; the best is reported.

pillow-simd replaces Pillow in its environment, so it is timed by running this script under a virtualenv that has it
(``--images DIR`` reuses the image set, ``--label`` names the run); decoders not installed are listed and skipped.

    python benchmarks/image_decoders.py [--images DIR] [--repeats 3]
    /path/to/simd-venv/bin/python benchmarks/image_decoders.py --images DIR --label pillow-simd --out NAME.json
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import functools
import importlib
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP")
Decoder = Callable[[bytes], object]


def build_images(out: Path, n_scenes: int, n_webp: int, seed: int) -> None:
    """Write the image set into ``out`` (imports the project, so only the building environment needs it)."""
    from curation_throughput import build_image_set

    files = build_image_set(out, n_scenes, seed)
    scenes = sorted(p for p, _ in files if p.name.startswith("scene_"))
    for path in scenes[:n_webp]:
        with Image.open(path) as image:
            image.convert("RGB").save(out / f"{path.stem}.webp", format="WEBP", quality=90)


def load_images(folder: Path) -> dict[str, list[bytes]]:
    """The files by format; a format this Pillow has no plugin for (pillow-simd built without libwebp) is left out."""
    by_format: dict[str, list[bytes]] = {fmt: [] for fmt in FORMATS}
    unreadable = 0
    for path in sorted(folder.iterdir()):
        try:
            with Image.open(path) as image:
                fmt = image.format
        except UnidentifiedImageError:
            unreadable += 1
            continue
        if fmt in by_format:
            by_format[fmt].append(path.read_bytes())
    if unreadable:
        print(f"left out {unreadable} files this Pillow ({Image.__version__}) cannot identify")
    return by_format


def _optional(module: str) -> object | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _copy_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """krea2_core.data.images.copy_size, restated so the script runs where the project is not installed (pillow-simd)."""
    scale = side / max(size)
    return size if scale >= 1 else (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def _pillow_thumbnail(image: Image.Image, side: int) -> Image.Image:
    image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


def decoders(side: int) -> tuple[dict[str, dict[str, tuple[Decoder, Decoder]]], list[str]]:
    """{format: {decoder: (decode, copy)}} for what is installed, and the names of those that are not."""
    missing: list[str] = []
    table: dict[str, dict[str, tuple[Decoder, Decoder]]] = {fmt: {} for fmt in FORMATS}

    def pillow_decode(data: bytes, box: bool = False) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        # JPEG only (a no-op for the others): DCT-scaled as far as the copy's size allows, as curation does; ``box``
        # asks for a side x side box instead, which keeps a wide image's short side >= side (curation before f005161)
        image.draft("RGB", (side, side) if box else _copy_size(image.size, side))
        image.load()
        return image

    pillow = "pillow-simd" if "post" in Image.__version__ else "Pillow"  # pillow-simd versions end in .postN
    for fmt in FORMATS:
        table[fmt][pillow] = (pillow_decode, lambda data: _pillow_thumbnail(pillow_decode(data), side))
    table["JPEG"][f"{pillow}, side x side draft box"] = (
        functools.partial(pillow_decode, box=True), lambda data: _pillow_thumbnail(pillow_decode(data, box=True), side))

    simplejpeg = _optional("simplejpeg")
    if simplejpeg is None:
        missing.append("simplejpeg")
    else:
        def simplejpeg_decode(data: bytes) -> np.ndarray:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            scale = min(1.0, side / max(height, width))
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=round(height * scale),
                                          min_width=round(width * scale))

        table["JPEG"]["simplejpeg"] = (simplejpeg_decode,
                                       lambda data: _pillow_thumbnail(Image.fromarray(simplejpeg_decode(data)), side))

    pyvips = _optional("pyvips")
    if pyvips is None:
        missing.append("pyvips")
    else:
        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)

        def vips_shrink(data: bytes) -> int:
            """The largest shrink-on-load factor (1, 2, 4, 8) that keeps the long side >= side."""
            header = pyvips.Image.new_from_buffer(data, "")
            factor = max(header.width, header.height) // side
            return max((f for f in (1, 2, 4, 8) if f <= factor), default=1)

        def vips_copy(data: bytes) -> np.ndarray:
            return pyvips.Image.thumbnail_buffer(data, side, height=side, size="down").numpy()

        table["JPEG"]["pyvips"] = (
            lambda data: pyvips.Image.new_from_buffer(data, "", shrink=vips_shrink(data)).numpy(), vips_copy)
        table["WEBP"]["pyvips"] = (
            lambda data: pyvips.Image.new_from_buffer(data, "", scale=1 / vips_shrink(data)).numpy(), vips_copy)
        table["PNG"]["pyvips"] = (lambda data: pyvips.Image.new_from_buffer(data, "").numpy(), vips_copy)

    imagecodecs = _optional("imagecodecs")
    if imagecodecs is None:
        missing.append("imagecodecs")
    else:
        for fmt, name, decode in (("PNG", "imagecodecs libspng", imagecodecs.spng_decode),
                                  ("PNG", "imagecodecs libpng", imagecodecs.png_decode),
                                  ("WEBP", "imagecodecs libwebp", imagecodecs.webp_decode),
                                  ("JPEG", "imagecodecs libjpeg-turbo (no scaling)", imagecodecs.jpeg8_decode)):
            table[fmt][name] = (decode, lambda data, decode=decode: _pillow_thumbnail(Image.fromarray(decode(data)),
                                                                                      side))

    pyspng = _optional("pyspng")
    if pyspng is None:
        missing.append("pyspng")
    else:
        table["PNG"]["pyspng"] = (pyspng.load, lambda data: _pillow_thumbnail(Image.fromarray(pyspng.load(data)), side))

    cv2 = _optional("cv2")
    if cv2 is None:
        missing.append("opencv")
    else:
        cv2.setNumThreads(1)
        reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                   8: cv2.IMREAD_REDUCED_COLOR_8}

        def cv2_decode(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as header:  # header only: OpenCV does not expose the size first
                factor = max(header.size) // side
            flag = reduced[max((f for f in reduced if f <= factor), default=1)]
            return cv2.imdecode(np.frombuffer(data, np.uint8), flag)

        for fmt in FORMATS:
            table[fmt]["opencv"] = (cv2_decode, lambda data: _pillow_thumbnail(
                Image.fromarray(cv2_decode(data)[..., ::-1]), side))
    return table, missing


def timed(fn: Decoder, files: list[bytes]) -> tuple[float, int]:
    """(seconds, failures) of one pass over ``files``."""
    failures = 0
    start = time.perf_counter()
    for data in files:
        try:
            if fn(data) is None:
                failures += 1
        except Exception:  # noqa: BLE001 - a decoder that cannot read a file is counted, not fatal
            failures += 1
    return time.perf_counter() - start, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, help="an image set written before (default: build one in a temp dir)")
    parser.add_argument("--n-scenes", type=int, default=230, help="world scenes added to the real photos")
    parser.add_argument("--n-webp", type=int, default=80, help="scenes also saved as WebP")
    parser.add_argument("--side", type=int, default=256, help="long side of the analysis copy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="names this environment in the results (e.g. pillow-simd)")
    parser.add_argument("--out", default="image_decoders.json", help="results file name under benchmarks/results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="krea2-decoders-") as tmp:
        folder = args.images or Path(tmp)
        if args.images is None or not any(folder.iterdir()):
            folder.mkdir(parents=True, exist_ok=True)
            build_images(folder, args.n_scenes, args.n_webp, args.seed)
        by_format = load_images(folder)

    table, missing = decoders(args.side)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for fmt, methods in table.items():
        files = by_format[fmt]
        if not files:
            continue
        for decode, copy in methods.values():  # warm-up
            timed(decode, files), timed(copy, files)
        best: dict[tuple[str, str], tuple[float, int]] = {}
        for _ in range(args.repeats):
            for name, pair in methods.items():
                for step, fn in zip(("decode", "copy"), pair, strict=True):
                    seconds, failures = timed(fn, files)
                    if (name, step) not in best or seconds < best[name, step][0]:
                        best[name, step] = (seconds, failures)
        baseline = next(iter(methods))  # Pillow (or pillow-simd in its environment)
        results[fmt] = {}
        for name in methods:
            row: dict[str, float] = {"images": len(files)}
            for step in ("decode", "copy"):
                seconds, failures = best[name, step]
                row[f"{step}_ms"] = 1000 * seconds / len(files)
                row[f"{step}_speed_vs_{baseline}"] = best[baseline, step][0] / seconds
                row[f"{step}_failures"] = failures
            results[fmt][name] = row

    label = f" [{args.label}]" if args.label else ""
    for fmt, rows in results.items():
        first = next(iter(rows))
        print()
        print(_common.markdown_table(
            ["decoder", "decode ms", f"decode x {first}", "copy ms", f"copy x {first}", "failures"],
            [[name, r["decode_ms"], r[f"decode_speed_vs_{first}"], r["copy_ms"], r[f"copy_speed_vs_{first}"],
              int(r["decode_failures"] + r["copy_failures"])] for name, r in rows.items()],
            caption=f"{fmt}{label}: {next(iter(rows.values()))['images']} images, best of {args.repeats} passes, "
                    f"1 thread"))
    if missing:
        print(f"\nnot installed here: {', '.join(missing)}")
    path = _common.write_json(args.out, {
        "benchmark": "image_decoders", "label": args.label, "pillow": Image.__version__,
        "settings": {"side": args.side, "repeats": args.repeats, "n_scenes": args.n_scenes, "n_webp": args.n_webp,
                     "seed": args.seed},
        "not_installed": missing, "results": results,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
