"""A raw image pool with ground truth: world scenes, injected defects and duplicates, real photos.

Writes ``images/`` (the pool to ingest), ``labels.parquet`` (per file: group, the verdict curation
should reach, and for copies the file they copy) and ``scenes.parquet`` (scene graph + captions of
every world image, for captioning and training later).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance
from tqdm.auto import trange

from krea2_core.world.captions import captions
from krea2_core.world.config import WorldPoolConfig
from krea2_core.world.render import render
from krea2_core.world.scene import COLORS, Scene, sample_scene
from krea2_core.world.split import MAX_DRAWS, draw_streams, split_of

POOL_IMAGES_DIR = "images"
LABELS_FILE = "labels.parquet"
POOL_SCENES_FILE = "scenes.parquet"
_REAL_SUFFIXES = {".jpg", ".jpeg", ".png"}
NEAR_TRANSFORMS = ("reencode", "resize", "crop", "recolor")

# defect name -> the verdict curation must reach for it
DEFECTS = {
    "truncated": "broken_file",
    "corrupt": "broken_file",
    "not_image": "not_an_image",
    "bomb": "decompression_bomb",
    "tiny": "min_resolution",
    "extreme_aspect": "aspect_ratio",
    "overexposed": "white_pixels",
    "underexposed": "black_pixels",
    "flat": "low_entropy",
    "noise": "extreme_texture",
    "letterbox": "flat_border",
    "frame": "flat_border",
}


def _encode(image: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the data stream holds one row)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1))) + chunk(b"IEND", b"")


def _scene_image(rng: np.random.Generator, width: int, height: int,
                 weights: dict[str, dict[str, float]] | None = None) -> tuple[Scene, Image.Image]:
    scene = sample_scene(rng, width, height, weights=weights)
    return scene, render(scene)


# the pixel-level defects (what the content filters catch) and the format each is saved in
_CONTENT_FORMATS = {"overexposed": "JPEG", "underexposed": "PNG", "flat": "PNG", "noise": "PNG", "letterbox": "JPEG",
                    "frame": "PNG"}


def content_defect(name: str, rng: np.random.Generator, base: Image.Image) -> Image.Image:
    """A pixel-level defect (one of ``_CONTENT_FORMATS``) made from a clean image, at its size."""
    w, h = base.size
    pixels = np.asarray(base).copy()
    if name == "overexposed":
        return Image.fromarray(np.clip(pixels.astype(np.int16) + 120, 0, 255).astype(np.uint8))
    if name == "underexposed":
        return Image.fromarray((pixels.astype(np.float32) * 0.02).astype(np.uint8))
    if name == "flat":
        colour = rng.integers(60, 200, 3)
        flat = np.broadcast_to(colour, (h, w, 3)) + rng.integers(-1, 2, (h, w, 3))
        return Image.fromarray(flat.astype(np.uint8))
    if name == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if name == "letterbox":
        bar = int(h * 0.15)
        pixels[:bar] = 0
        pixels[-bar:] = 0
        return Image.fromarray(pixels)
    if name == "frame":
        edge = int(min(w, h) * 0.12)
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        pixels[:edge], pixels[-edge:], pixels[:, :edge], pixels[:, -edge:] = colour, colour, colour, colour
        return Image.fromarray(pixels)
    raise ValueError(f"unknown content defect {name!r}; they are {sorted(_CONTENT_FORMATS)}")


def _defect(name: str, rng: np.random.Generator, base: Image.Image) -> tuple[bytes, str]:
    """(file bytes, suffix) of one defect instance derived from a clean world image."""
    if name in _CONTENT_FORMATS:
        fmt = _CONTENT_FORMATS[name]
        return _encode(content_defect(name, rng, base), fmt), ".jpg" if fmt == "JPEG" else ".png"
    w, h = base.size
    if name == "truncated":
        data = _encode(base, "JPEG")
        return data[: len(data) * 2 // 5], ".jpg"
    if name == "corrupt":
        data = bytearray(_encode(base, "PNG"))
        start = len(data) // 3
        data[start:start + 256] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
        return bytes(data), ".png"
    if name == "not_image":
        return b"<!doctype html><html><body>404 Not Found</body></html>\n", ".jpg"
    if name == "bomb":
        return _bomb_png(40_000, 40_000), ".png"
    if name == "tiny":
        return _encode(base.resize((20, 20), Image.Resampling.LANCZOS), "PNG"), ".png"
    if name == "extreme_aspect":
        return _encode(base.resize((w * 3, max(h // 2, 140)), Image.Resampling.BILINEAR), "JPEG"), ".jpg"
    raise ValueError(f"unknown defect {name!r}")


def near_copy(transform: str, rng: np.random.Generator, image: Image.Image) -> bytes:
    w, h = image.size
    if transform == "reencode":
        return _encode(image, "JPEG", quality=int(rng.integers(55, 75)))
    if transform == "resize":
        scale = float(rng.uniform(0.6, 0.85))
        return _encode(image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS), "JPEG")
    if transform == "crop":
        # pHash is not crop-robust: beyond ~1.5% per side copies drift past any safe threshold
        # (benchmarks/near_duplicates.py reports recall against crop size)
        dx, dy = max(1, int(w * rng.uniform(0.005, 0.015))), max(1, int(h * rng.uniform(0.005, 0.015)))
        return _encode(image.crop((dx, dy, w - dx, h - dy)), "JPEG")
    if transform == "recolor":
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(1.04, 1.1)))
        return _encode(ImageEnhance.Color(image).enhance(float(rng.uniform(0.85, 0.95))), "JPEG")
    raise ValueError(f"unknown near-duplicate transform {transform!r}")


def recolored(scene: Scene, rng: np.random.Generator) -> Scene:
    """Same layout, every shape in another colour: a different image that pHash alone would merge. Drawn again
    until the new content is a training scene (world.split)."""
    for stream in draw_streams(rng, MAX_DRAWS):
        shapes = tuple(dataclasses.replace(s, color=str(stream.choice([c for c in COLORS if c != s.color])))
                       for s in scene.shapes)
        variant = dataclasses.replace(scene, shapes=shapes)
        if split_of(variant) == "train":
            return variant
    raise ValueError(f"no training-split recolouring of {scene} in {MAX_DRAWS} draws")


def real_image_files(dirs: list[str], limit: int) -> list[Path]:
    """Real photos from installed packages ("skimage" names scikit-image's bundled data); at most ``limit``, evenly
    spaced over the sorted listing so that a small limit still draws from every folder."""
    files: list[Path] = []
    for entry in dirs:
        if entry == "skimage":
            import skimage

            root = Path(skimage.__file__).parent / "data"
        else:
            root = Path(entry)
        if not root.is_dir():
            raise FileNotFoundError(f"real image folder {root} is missing; install it (see .ci/setup) or "
                                    f"remove it from world.real_image_dirs")
        files += sorted(p for p in root.rglob("*") if p.suffix.lower() in _REAL_SUFFIXES and p.is_file())
    if len(files) <= limit:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]


def build_world_pool(config: WorldPoolConfig, out_dir: Path) -> dict[str, int]:
    rng = np.random.default_rng(config.seed)
    images = out_dir / POOL_IMAGES_DIR
    images.mkdir(parents=True)
    labels: list[dict[str, object]] = []
    scenes: list[dict[str, object]] = []

    def add(name: str, data: bytes, group: str, expected: str | None, copy_of: str | None = None,
            scene: Scene | None = None) -> None:
        (images / name).write_bytes(data)
        labels.append({"file": name, "group": group, "expected_reason": expected, "copy_of": copy_of})
        if scene is not None:
            scenes.append({"file": name, "scene": json.dumps(scene.to_dict()), **captions(scene)})

    originals: list[tuple[str, Scene, Image.Image]] = []
    for index in trange(config.n_scenes, desc="render world scenes", unit="img"):
        long_side = int(rng.integers(config.min_side, config.max_side + 1))
        short_side = int(long_side / rng.uniform(1.0, 1.8))
        width, height = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        scene, image = _scene_image(rng, width, height, config.weights)
        fmt, suffix = ("JPEG", ".jpg") if rng.random() < 0.4 else ("PNG", ".png")
        name = f"scene_{index:05d}{suffix}"
        add(name, _encode(image, fmt), "scene", None, scene=scene)
        originals.append((name, scene, image))

    picks = rng.permutation(len(originals))
    cursor = 0
    for k in range(config.n_exact_duplicates):
        name, scene, _ = originals[picks[cursor]]
        cursor += 1
        add(f"copy_{k:04d}{Path(name).suffix}", (images / name).read_bytes(), "exact_duplicate", "exact_duplicate",
            copy_of=name, scene=scene)
    for k in range(config.n_near_duplicates):
        name, scene, image = originals[picks[cursor]]
        cursor += 1
        transform = NEAR_TRANSFORMS[k % len(NEAR_TRANSFORMS)]
        add(f"near_{transform}_{k:04d}.jpg", near_copy(transform, rng, image), "near_duplicate", "near_duplicate",
            copy_of=name, scene=scene)
    for k in range(config.n_color_variants):
        name, scene, _ = originals[picks[cursor]]
        cursor += 1
        variant = recolored(scene, rng)
        add(f"variant_{k:04d}.png", _encode(render(variant), "PNG"), "color_variant", None, copy_of=name,
            scene=variant)

    for defect, expected in DEFECTS.items():
        for k in range(config.n_per_defect):
            _, base = _scene_image(rng, int(rng.integers(config.min_side, config.max_side + 1)),
                                   int(rng.integers(config.min_side, config.max_side + 1)))
            data, suffix = _defect(defect, rng, base)
            add(f"defect_{defect}_{k:03d}{suffix}", data, f"defect:{defect}", expected)

    for k, path in enumerate(real_image_files(config.real_image_dirs, config.max_real_images)):
        name = f"real_{k:04d}_{path.stem[:40]}{path.suffix.lower()}"
        shutil.copyfile(path, images / name)
        labels.append({"file": name, "group": "real", "expected_reason": None, "copy_of": None})

    pd.DataFrame(labels).to_parquet(out_dir / LABELS_FILE, index=False)
    pd.DataFrame(scenes).to_parquet(out_dir / POOL_SCENES_FILE, index=False)
    groups = pd.Series([label["group"] for label in labels]).value_counts()
    return {"files": len(labels), **{f"group.{g}": int(n) for g, n in groups.items()}}
