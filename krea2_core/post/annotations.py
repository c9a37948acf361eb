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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from krea2_core.config import PipelineConfig
from krea2_core.data.schemas import Annotations, read_table, write_table
from krea2_core.post.config import SamplerConfig
from krea2_core.post.oracle import PreferenceOracle, WorldCheckerOracle, judge, keyed
from krea2_core.post.pairs import (BATCH, PAIR_COLUMNS, SKIPPED_COLUMNS, Draw, PairSettings, load_pipes,
                                   pair_settings, png_bytes, sample_draws, skip_counts, source_name, write_pairs)
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.config import RunConfig
from krea2_core.world.captions import sample_prompts

TABLE_FILE = "annotations.parquet"
ANNOTATED_IMAGES_DIR = "images"
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


@dataclass
class SimulatedAnnotations:
    """How a simulated annotation table is made: ``n`` fresh samples of the policy against the previous checkpoint,
    both with the synthetic pairs' policy sampler, on prompts seeded apart from theirs, labelled by the oracle (a tie
    within ``min_margin``) with ``label_noise``."""

    policy: SamplerConfig
    seed: int  # the synthetic pairs' seed: these prompts are drawn from seed + 1
    min_margin: float
    n: int
    label_noise: float
    resolution: int
    trainer: RunConfig
    batch: int = BATCH  # decides the call seeds, as in PairSettings


def simulated_like(pairs: PairSettings, n: int, label_noise: float) -> SimulatedAnnotations:
    """Simulated annotations sampled like the synthetic ``pairs``."""
    return SimulatedAnnotations(policy=pairs.pairs.policy, seed=pairs.pairs.seed, min_margin=pairs.pairs.min_margin,
                                n=n, label_noise=label_noise, resolution=pairs.resolution, trainer=pairs.trainer,
                                batch=pairs.batch)


def simulate_annotations(policy: Path, previous: Path, simulated: SimulatedAnnotations, out_dir: Path,
                         oracle: PreferenceOracle | None = None) -> Path:
    """Write a simulated annotation table (``annotations.parquet`` + ``images/``) into ``out_dir``: the policy
    against the previous checkpoint (same sampler settings, sides shuffled) on prompts seeded apart from the
    synthetic pairs; returns the table's path."""
    oracle = oracle or WorldCheckerOracle()
    pretrain, resolution = simulated.trainer, simulated.resolution
    seed, n = simulated.seed + 1, simulated.n
    prompts = [p for p, _ in sample_prompts(np.random.default_rng(seed), n, resolution, resolution)]
    samplers = [simulated.policy, dataclasses.replace(simulated.policy, checkpoint="previous")]
    policy_is_b = np.random.default_rng([seed, 3]).random(n) < 0.5
    draws = [Draw(i, samplers[int(swap) if side == "a" else 1 - int(swap)], side)
             for side in ("a", "b") for i, swap in enumerate(policy_is_b)]
    with tqdm(total=2 * n, desc="simulated annotations", mininterval=5) as progress:
        images = sample_draws(draws, [p.text for p in prompts], load_pipes(policy, previous, pretrain),
                              resolution=resolution, shift=pretrain.eval.shift, seed=seed, salt=SIMULATED,
                              batch_size=simulated.batch, progress=progress)
    choices = simulated_choices(oracle.score(images[:n], prompts), oracle.score(images[n:], prompts),
                                simulated.min_margin, simulated.label_noise, seed)
    (out_dir / ANNOTATED_IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    files = []
    for draw, image in zip(draws, images, strict=True):
        name = f"{ANNOTATED_IMAGES_DIR}/{SIMULATED}-{draw.prompt:06d}-{draw.side}-{source_name(draw.sampler)}.png"
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


@dataclass
class AnnotationSettings:
    """What the calibration pairs depend on: the human table's content (``table_sha256``), or how the simulated
    table is made (``simulated``, when there is no table)."""

    resolution: int
    table_sha256: str = ""
    simulated: Optional[SimulatedAnnotations] = None


def annotation_settings(config: PipelineConfig, annotations: Path | None) -> AnnotationSettings:
    """The settings with the human annotation set ``annotations`` (a local copy of ``post.preference.annotations``),
    or with simulated annotators when it is None. Its table is checked (SchemaError) here, before anything runs."""
    resolution = config.post.resolution
    if annotations is not None:
        return AnnotationSettings(resolution=resolution, table_sha256=table_digest(Path(annotations) / TABLE_FILE))
    po = config.post.preference
    return AnnotationSettings(resolution=resolution, simulated=simulated_like(
        pair_settings(config), po.simulated_annotations, po.simulated_label_noise))


def annotation_set(config: PipelineConfig) -> Path | None:
    """The human annotation set a local run reads (``post.preference.annotations``), None for simulated annotators."""
    return Path(config.post.preference.annotations) if config.post.preference.annotations else None


def run_annotation_pairs(inputs: Mapping[str, Path], settings: AnnotationSettings, parent_run_id: str = "", *,
                         annotations: Path | None = None, root: Path | None = None,
                         oracle: PreferenceOracle | None = None) -> Path:
    """The calibration pairs: from the human annotation set ``annotations`` (a folder: ``annotations.parquet`` and the
    images it names; ``settings`` holds its digest), or, with simulated annotators, from a table written into the
    artifact (``simulated/``) from ``policy`` and ``previous``."""
    simulated = settings.simulated
    table = Path(annotations) / TABLE_FILE if annotations is not None else None
    if (table is None) == (simulated is None):
        raise ValueError("the calibration pairs come from a human annotation set or from simulated annotators: "
                         f"got {'neither' if table is None else 'both'}")
    if table is not None and table_digest(table) != settings.table_sha256:
        raise ValueError(f"{table}: the annotation table changed since its settings were made (sha256 "
                         f"{settings.table_sha256[:12]}...); make them again")

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        if simulated is not None:
            written = simulate_annotations(paths["policy"], paths["previous"], simulated, staging / SIMULATED, oracle)
            pairs, skipped = load_annotations(written, settings.resolution, origin=SIMULATED)
        else:
            pairs, skipped = load_annotations(Path(table), settings.resolution)
        write_pairs(pairs, skipped, staging, run, ANNOTATIONS.name)
        rows = len(pairs) + len(skipped)
        metrics = {"usable_fraction": len(pairs) / rows}
        if simulated is not None:
            metrics[f"{SIMULATED}.policy_win_rate"] = float(pairs["winner_source"].str.contains("-policy-").mean())
        return StageOutput(counts={"rows": rows, "pairs": len(pairs), SIMULATED: int(simulated is not None),
                                   **skip_counts(skipped)}, metrics=metrics)

    return execute_stage(ANNOTATIONS.name, ANNOTATIONS.kind, body, config=keyed(settings, oracle),
                         inputs=dict(inputs) if simulated is not None else {}, parent_run_id=parent_run_id,
                         root=root)[0]


def _simulated(config: PipelineConfig) -> bool:
    return not config.post.preference.annotations


# simulated annotators label the synthetic policy's samples against the previous checkpoint's; a human set needs neither
ANNOTATIONS = StageSpec("preference_annotations", "preference_pairs",
                        {"policy": "preference_synthetic", "previous": "midtrain"},
                        lambda p: annotation_settings(p, annotation_set(p)), run_annotation_pairs,
                        optional={"policy": _simulated, "previous": _simulated},
                        files=lambda p: {"annotations": annotation_set(p)})
