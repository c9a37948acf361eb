"""Human annotations for PO's second stage (calibration): a table of (prompt, image a, image b, choice) rows
turned into preference pairs, every unusable row recorded with its reason.

Without a human table (the tiny preset) ``simulate_annotations`` writes one from fresh policy-vs-previous
samples labelled by a simulated annotator: the oracle plus label noise. Such a table, its pairs and its files
are named "simulated" throughout (annotator, pair ids, file names, the pairs' origin).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from krea2_core.artifacts import Manifest
from krea2_core.config import PreferenceConfig, PretrainConfig
from krea2_core.data.schemas import Annotations, read_table, write_table
from krea2_core.post.oracle import PreferenceOracle, WorldCheckerOracle, judge
from krea2_core.post.pairs import (PAIR_COLUMNS, SKIPPED_COLUMNS, Draw, generation_view, load_pipes, png_bytes,
                                   sample_draws, skip_counts, source_name, write_pairs)
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.world.captions import sample_prompts

TABLE_FILE = "annotations.parquet"
IMAGES_DIR = "images"
SIMULATED = "simulated"


def _resolve(base: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else base / path


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _row_images(paths: dict[str, Path], choice: str, resolution: int) -> dict[str, Image.Image]:
    """The row's two images by side; raises _Unusable with the first rule the row breaks."""
    missing = [f"image_{side} {path}" for side, path in paths.items() if not path.is_file()]
    if missing:
        raise _Unusable("missing_image", "not found: " + ", ".join(missing))
    raw = {side: path.read_bytes() for side, path in paths.items()}
    images = {}
    for side, data in raw.items():
        try:
            images[side] = _decode(data)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _Unusable("unreadable_image", f"image_{side} {paths[side]}: {err}") from None
    a, b = images["a"], images["b"]
    if raw["a"] == raw["b"] or (a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))):
        raise _Unusable("identical", f"{paths['a']} and {paths['b']} hold the same image")
    if a.size != b.size or a.size != (resolution, resolution):
        raise _Unusable("mismatched_resolution", f"image_a is {a.width}x{a.height}, image_b is {b.width}x{b.height}; "
                                                  f"expected {resolution}x{resolution}")
    if choice == "tie":
        raise _Unusable("tie", "the annotator saw no difference")
    return images


def load_annotations(table: Path, resolution: int, *, origin: str = "human") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs in the PreferencePairs schema, skipped rows in the Skipped schema) of an annotation table. A table
    that breaks the Annotations schema raises SchemaError; a row with a missing, unreadable or identical image,
    a size other than ``resolution`` x ``resolution``, or a tie is skipped with that reason."""
    table = Path(table)
    frame = read_table(table, Annotations)
    rows, skipped = [], []
    for row in frame.itertuples(index=False):
        paths = {"a": _resolve(table.parent, row.image_a), "b": _resolve(table.parent, row.image_b)}
        try:
            images = _row_images(paths, row.choice, resolution)
        except _Unusable as skip:
            skipped.append({"pair_id": row.pair_id, "reason": skip.reason, "detail": skip.detail})
            continue
        won, lost = ("a", "b") if row.choice == "a" else ("b", "a")
        rows.append({
            "pair_id": row.pair_id, "prompt": row.prompt, "rubric": "[]", "width": resolution, "height": resolution,
            "winner": png_bytes(images[won]), "loser": png_bytes(images[lost]),
            "winner_source": f"{won}:{paths[won].name}", "loser_source": f"{lost}:{paths[lost].name}",
            "on_policy": False, "winner_score": None, "loser_score": None, "origin": origin})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def simulated_choices(scores_a: Sequence[float], scores_b: Sequence[float], min_margin: float, noise: float,
                      seed: int) -> list[str]:
    """A simulated annotator: the oracle's verdict ("tie" within ``min_margin``), flipped with probability
    ``noise`` (one seeded draw per row, so a row's flip does not depend on the others)."""
    flips = np.random.default_rng([seed, 2]).random(len(scores_a)) < noise
    choices = []
    for score_a, score_b, flip in zip(scores_a, scores_b, flips, strict=True):
        verdict = judge(score_a, score_b, min_margin)
        choices.append({"a": "b", "b": "a"}.get(verdict, verdict) if flip else verdict)
    return choices


def simulate_annotations(policy: Path, previous: Path, config: PreferenceConfig, pretrain: PretrainConfig,
                         resolution: int, out_dir: Path, oracle: PreferenceOracle | None = None) -> Path:
    """Write a simulated annotation table (``annotations.parquet`` + ``images/``) into ``out_dir``: the policy
    against the previous checkpoint (same sampler settings, sides shuffled) on prompts seeded apart from the
    synthetic pairs; returns the table's path."""
    oracle = oracle or WorldCheckerOracle()
    seed, n = config.pairs.seed + 1, config.simulated_annotations
    prompts = [p for p, _ in sample_prompts(np.random.default_rng(seed), n, resolution, resolution)]
    samplers = [config.pairs.policy, dataclasses.replace(config.pairs.policy, checkpoint="previous")]
    policy_is_b = np.random.default_rng([seed, 3]).random(n) < 0.5
    draws = [Draw(i, samplers[int(swap) if side == "a" else 1 - int(swap)], side)
             for side in ("a", "b") for i, swap in enumerate(policy_is_b)]
    with tqdm(total=2 * n, desc="simulated annotations", mininterval=5) as progress:
        images = sample_draws(draws, [p.text for p in prompts], load_pipes(policy, previous, pretrain),
                              resolution=resolution, shift=pretrain.eval.shift, seed=seed, salt=SIMULATED,
                              progress=progress)
    choices = simulated_choices(oracle.score(images[:n], prompts), oracle.score(images[n:], prompts),
                                config.pairs.min_margin, config.simulated_label_noise, seed)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    files = []
    for draw, image in zip(draws, images, strict=True):
        name = f"{IMAGES_DIR}/{SIMULATED}-{draw.prompt:06d}-{draw.side}-{source_name(draw.sampler)}.png"
        (out_dir / name).write_bytes(png_bytes(image))
        files.append(name)
    frame = pd.DataFrame({"pair_id": [f"{SIMULATED}-{i:06d}" for i in range(n)], "prompt": [p.text for p in prompts],
                          "image_a": files[:n], "image_b": files[n:], "choice": choices, "annotator": SIMULATED})
    write_table(frame, out_dir / TABLE_FILE, Annotations)
    return out_dir / TABLE_FILE


def table_digest(table: Path) -> str:
    """sha256 of an annotation table's bytes and of every image file it names (a missing file hashes as such),
    so editing the table or replacing an image changes the stage's cache key."""
    table = Path(table)
    frame = read_table(table, Annotations)
    h = hashlib.sha256(table.read_bytes())
    for name in sorted(set(frame["image_a"]) | set(frame["image_b"])):  # as written: a moved folder keeps its key
        file = _resolve(table.parent, name)
        h.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"<missing>") + b"\0")
    return h.hexdigest()


def annotation_view(config: PreferenceConfig, pretrain: PretrainConfig, resolution: int,
                    oracle: PreferenceOracle | None = None, annotations: Path | None = None) -> dict[str, Any]:
    """What the calibration pairs depend on: the human table's content, or how the simulated table is made."""
    if annotations is not None:
        return {"annotations_sha256": table_digest(Path(annotations)), "resolution": resolution}
    return {SIMULATED: {**generation_view(config, pretrain, resolution, oracle or WorldCheckerOracle()),
                        "n": config.simulated_annotations, "label_noise": config.simulated_label_noise}}


def run_annotation_pairs(annotations: Path | None, policy: Path, previous: Path, config: PreferenceConfig,
                         pretrain: PretrainConfig, resolution: int, *, parent_run_id: str = "",
                         root: Path | None = None, oracle: PreferenceOracle | None = None) -> tuple[Path, Manifest]:
    """The calibration pairs: from the human table ``annotations``, or, when None, from a simulated table
    written into the artifact (``simulated/``) from ``policy`` and ``previous``."""
    oracle = oracle or WorldCheckerOracle()
    # a human table is checked (SchemaError) before anything runs; its content, not its path, is the cache key
    view = annotation_view(config, pretrain, resolution, oracle, annotations)
    inputs = {"policy": policy, "previous": previous} if annotations is None else {}

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        if annotations is None:
            table = simulate_annotations(paths["policy"], paths["previous"], config, pretrain, resolution,
                                         staging / SIMULATED, oracle)
            pairs, skipped = load_annotations(table, resolution, origin=SIMULATED)
        else:
            pairs, skipped = load_annotations(Path(annotations), resolution)
        write_pairs(pairs, skipped, staging, run, "preference_annotations")
        rows = len(pairs) + len(skipped)
        metrics = {"usable_fraction": len(pairs) / rows}
        if annotations is None:
            metrics[f"{SIMULATED}.policy_win_rate"] = float(pairs["winner_source"].str.contains("-policy-").mean())
        return StageOutput(counts={"rows": rows, "pairs": len(pairs), SIMULATED: int(annotations is None),
                                   **skip_counts(skipped)}, metrics=metrics)

    return execute_stage("preference_annotations", "preference_pairs", body, config=view, inputs=inputs,
                         parent_run_id=parent_run_id, root=root)
