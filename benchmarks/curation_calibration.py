"""Per-filter precision and recall of curation's content filters at many resolutions and encodings.

A labelled set is generated: for each long side in ``--sizes`` (4:3, 64 px to 8k) and each encoding (PNG, JPEG q90,
WebP q90), a clean world scene and each content defect made from one (the world pool's recipes: noise, flat,
letterbox, frame, overexposed, underexposed), plus the real photos (scikit-image samples and desktop wallpapers) at
their native size and resized to every size (JPEG q90). Every image is scored by ``score_image`` (the analysis copy
curation measures) and judged by the default ``StageFilters`` (``min_side`` 1: the size filter is not under test).

Reported per filter (white_pixels, black_pixels, low_entropy, extreme_texture, flat_border): precision and recall of
the rule firing (any of a row's reasons, not only the first; a false positive is a clean image it rejects), overall
and per size, and the false-rejection rate of clean world scenes, real photos and real graphics (``GRAPHICS``: test
patterns, transparent overlays, logos on flat backgrounds) when any content rule fires, per size.

    python benchmarks/curation_calibration.py [--sizes 64 160 320 640 1280 2560 7680] [--scenes 3] [--photos-at-8k 12]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from krea2_core.curation.config import AnalysisConfig, StageFilters
from krea2_core.data.curation import FILTER_RULES, rule_failures, score_image
from krea2_core.world import render, sample_scene
from krea2_core.world.pool import DEFECTS, content_defect, real_image_files

# real images that are graphics, not photographs: scikit-image's test patterns, wallpapers that are transparent
# overlays (blank white once composited on white, as a trainer sees them) or a logo on a flat background
GRAPHICS = ("chessboard_GRAY.png", "chessboard_RGB.png", "horse.png", "phantom.png", "Arc-Colors-Transparent",
            "Flow.png", "Gulp.png", "Silk.png", "Spring.png", "Waves.png", "MATE-Stripes-Light.png",
            "GreenTraditional.jpg")
CONTENT_DEFECTS = ("noise", "flat", "letterbox", "frame", "overexposed", "underexposed")
CONTENT_RULES = [rule for rule in FILTER_RULES if rule not in ("min_resolution", "aspect_ratio")]
ENCODINGS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 90}), "webp": ("WEBP", {"quality": 90})}


def _encode(image: Image.Image, encoding: str) -> bytes:
    fmt, options = ENCODINGS[encoding]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A world scene at this size (drawn at up to 2048 px, then resized: the renderer's cost grows with area)."""
    scene = render(sample_scene(rng, min(width, 2048), min(height, 1536), split=None))
    return scene.resize((width, height), Image.Resampling.LANCZOS) if width > 2048 else scene


def labelled_set(sizes: list[int], scenes: int, photos_at_8k: int, seed: int) -> Iterator[dict[str, object]]:
    """(group, expected rule or None, long side, encoding, file bytes) rows."""
    rng = np.random.default_rng(seed)
    for side in sizes:
        width, height = side, side * 3 // 4
        clean = [_scene(rng, width, height) for _ in range(scenes)]
        for encoding in ENCODINGS:
            for image in clean:
                yield {"group": "world", "expected": None, "side": side, "encoding": encoding,
                       "data": _encode(image, encoding)}
            base = clean[0]
            for defect in CONTENT_DEFECTS:
                yield {"group": f"defect:{defect}", "expected": DEFECTS[defect], "side": side, "encoding": encoding,
                       "data": _encode(content_defect(defect, rng, base), encoding)}
    photos = real_image_files(["skimage", "/usr/share/backgrounds"], limit=1000)
    for k, path in enumerate(photos):
        data = path.read_bytes()
        group = "graphic" if any(path.name.startswith(name) for name in GRAPHICS) else "photo"
        yield {"group": group, "expected": None, "side": 0, "encoding": "native", "data": data}
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for side in sizes:
            if side > 2560 and k >= photos_at_8k:
                continue
            scale = side / max(image.size)
            resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                   Image.Resampling.LANCZOS)
            yield {"group": group, "expected": None, "side": side, "encoding": "jpeg",
                   "data": _encode(resized, "jpeg")}


def judge(rows: list[dict[str, object]]) -> pd.DataFrame:
    config, filters = AnalysisConfig(), StageFilters(min_side=1)
    scored = pd.DataFrame([{**{k: v for k, v in row.items() if k != "data"}, **score_image(row["data"], config)}
                           for row in rows])
    failures = rule_failures(scored, filters)
    return pd.concat([scored, failures[CONTENT_RULES]], axis=1)


def precision_recall(judged: pd.DataFrame) -> pd.DataFrame:
    out = []
    for side, part in [("all", judged), *judged.groupby("side")]:
        for rule in CONTENT_RULES:
            fired, expected = part[rule], part["expected"] == rule
            hits = int((fired & expected).sum())
            # a false positive is a clean image the rule rejects (a defect of another kind that also breaks this rule
            # is rejected rightly: a row records every rule it breaks)
            wrong = int((fired & part["expected"].isna()).sum())
            out.append({"side": side, "rule": rule, "expected": int(expected.sum()), "hits": hits,
                        "false_positives": wrong,
                        "precision": hits / (hits + wrong) if hits + wrong else float("nan"),
                        "recall": hits / expected.sum() if expected.sum() else float("nan")})
    return pd.DataFrame(out)


def false_rejections(judged: pd.DataFrame) -> pd.DataFrame:
    clean = judged[judged["expected"].isna()].assign(rejected=lambda f: f[CONTENT_RULES].any(axis=1))
    table = clean.groupby(["group", "side"]).agg(images=("rejected", "size"), rejected=("rejected", "sum"))
    return table.assign(rate=table["rejected"] / table["images"]).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 160, 320, 640, 1280, 2560, 7680])
    parser.add_argument("--scenes", type=int, default=3, help="clean world scenes per size and encoding")
    parser.add_argument("--photos-at-8k", type=int, default=12, help="photos resized to sizes above 2560 px")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    judged = judge(list(labelled_set(args.sizes, args.scenes, args.photos_at_8k, args.seed)))
    metrics, rejected = precision_recall(judged), false_rejections(judged)
    overall = metrics[metrics["side"] == "all"]
    print(_common.markdown_table(["rule", "defects", "caught", "clean rejected", "precision", "recall"],
                                 [[r.rule, r.expected, r.hits, r.false_positives, f"{r.precision:.3f}",
                                   f"{r.recall:.3f}"] for r in overall.itertuples()], caption="every size"))
    print()
    per_size = (metrics[metrics["side"] != "all"].pivot(index="side", columns="rule", values="recall")
                .dropna(how="all"))  # native size (0): real images only, no defects
    print(_common.markdown_table(["side", *per_size.columns], [[side, *(f"{v:.2f}" for v in row)]
                                                              for side, row in per_size.iterrows()],
                                 caption="recall per long side"))
    print()
    print(_common.markdown_table(["group", "side (0: native)", "images", "rejected", "rate"],
                                 [[r.group, r.side, r.images, r.rejected, f"{r.rate:.3f}"]
                                  for r in rejected.itertuples()], caption="clean images rejected"))
    missed = judged[judged["expected"].notna()].loc[lambda f: ~f.apply(lambda r: bool(r[r["expected"]]), axis=1)]
    wrong = judged[judged["expected"].isna() & judged[CONTENT_RULES].any(axis=1)]
    _common.write_json("curation_calibration.json", {
        "overall": overall.to_dict("records"), "per_size": metrics.to_dict("records"),
        "false_rejections": rejected.to_dict("records"),
        "missed": missed[["group", "side", "encoding", *CONTENT_RULES]].to_dict("records"),
        "wrongly_rejected": wrong[["group", "side", "encoding", *CONTENT_RULES]].to_dict("records")})


if __name__ == "__main__":
    main()
