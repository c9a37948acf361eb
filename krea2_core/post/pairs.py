"""Synthetic preference pairs for the first PO stage, delta-learning style.

For each world prompt the policy's own sample meets an opponent (a weaker checkpoint, a cheaper sampler, or the
policy again with other noise); a small ``off_policy_fraction`` of prompts pairs two samples of the previous
checkpoint instead, so most pairs hold at least one on-policy sample. An oracle scores both images; the
higher score wins, and ties and byte-identical images are recorded as skipped, never used.

Noise: ``TextToImage.generate`` seeds image i of a call by (call seed, i). Prompts are processed in chunks of
``CHUNK`` (bounded memory); inside a chunk images are generated in groups of one (checkpoint, steps, cfg, pair
side) and in batches of ``BATCH`` prompts, and each batch's call seed is a hash of (pairs seed, chunk, group,
batch number). So every image's noise is reproducible from the config, two images of one pair never share noise
(their sides are different groups) and no two batches share a call seed.

Artifact (kind ``preference_pairs``): ``pairs.parquet`` (schema PreferencePairs), ``skipped.parquet`` (schema
Skipped), ``samples.png`` (rows of winner | loser).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from krea2_core.common.layout import SAMPLES_FILE
from krea2_core.config import PipelineConfig
from krea2_core.post.config import PairsConfig, SamplerConfig
from krea2_core.training.config import RunConfig
from krea2_core.data.schemas import PreferencePairs, Skipped, read_table, write_table
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.oracle import PreferenceOracle, WorldCheckerOracle, judge, keyed
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.image_model import ModelIndex, load_text_to_image, new_model
from krea2_core.evaluation.prompt_following import image_grid
from krea2_core.world.captions import Prompt, sample_prompts

PAIRS_FILE = "pairs.parquet"
SKIPPED_FILE = "skipped.parquet"
BATCH = 16  # prompts per generate call (the default of PairSettings.batch)
CHUNK = 256  # prompts sampled, judged and encoded at a time (the default of PairSettings.chunk)
GRID_PAIRS = 8  # winner | loser rows in samples.png

PAIR_COLUMNS = list(PreferencePairs.to_schema().columns)
SKIPPED_COLUMNS = list(Skipped.to_schema().columns)


@dataclass(frozen=True)
class Draw:
    """One image to sample: the prompt's index, the checkpoint and sampler, and the side of its pair."""

    prompt: int
    sampler: SamplerConfig
    side: str  # "a" or "b"

    @property
    def source(self) -> str:
        return source_name(self.sampler)


def source_name(sampler: SamplerConfig) -> str:
    """The checkpoint and sampler that made an image, e.g. ``policy-s12-cfg4``."""
    return f"{sampler.checkpoint}-s{sampler.steps}-cfg{sampler.cfg_scale:g}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def call_seed(seed: int, group: str, batch: int) -> int:
    # < 2**32, so generate's (seed * 100_003 + i) stays far inside torch's 64-bit seed range
    return int(hashlib.sha256(f"{seed}/{group}/{batch}".encode()).hexdigest()[:8], 16)


def load_pipes(policy: Path, previous: Path, pretrain: RunConfig) -> dict[str, TextToImage]:
    """"policy" and "previous" checkpoints, as they describe themselves, sharing one frozen autoencoder and text
    encoder (ValueError if they were trained with different ones)."""
    if ModelIndex.read(previous) != ModelIndex.read(policy):
        raise ValueError(f"the previous checkpoint {previous} is another model than the policy {policy}: a pair "
                         "compares two checkpoints of one model")
    device = torch.device("cuda" if pretrain.parallel.device == "cuda" else "cpu")
    pipe = load_text_to_image(policy, pretrain.parallel, device, seed=pretrain.seed)
    pipe.model.eval()
    return {"policy": pipe,
            "previous": dataclasses.replace(pipe, model=new_model(previous, device, seed=pretrain.seed).eval())}


def sample_draws(draws: Sequence[Draw], prompts: Sequence[str], pipes: dict[str, TextToImage], *, resolution: int,
                 shift: float, seed: int, salt: str, batch_size: int, progress: tqdm) -> list[Image.Image]:
    """One image per draw (in draw order), generated in batches of ``batch_size`` of one group (checkpoint, sampler,
    side); call seeds hash (seed, salt, group, batch), so calls with another ``salt`` never share noise."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, draw in enumerate(draws):
        groups.setdefault((draw.source, draw.side), []).append(i)
    images: dict[int, Image.Image] = {}
    for (source, side), members in sorted(groups.items()):
        sampler = draws[members[0]].sampler
        for batch, start in enumerate(range(0, len(members), batch_size)):
            chunk = members[start:start + batch_size]
            out = pipes[sampler.checkpoint].generate(
                [prompts[draws[i].prompt] for i in chunk], width=resolution, height=resolution, steps=sampler.steps,
                cfg_scale=sampler.cfg_scale, shift=shift, seed=call_seed(seed, f"{salt}/{source}/{side}", batch))
            images.update(zip(chunk, out, strict=True))
            progress.update(len(chunk))
    return [images[i] for i in range(len(draws))]


def plan_draws(pairs: PairsConfig, n_prompts: int) -> tuple[list[Draw], list[Draw]]:
    """(side a, side b) per prompt. On-policy: a = the policy sampler, b = ``opponents[i % len]``. Off-policy
    (the first round(off_policy_fraction * n) of a seeded permutation): both from the previous checkpoint, a with
    the policy's sampler settings, b with the opponent's."""
    order = np.random.default_rng([pairs.seed, 1]).permutation(n_prompts)
    off_policy = set(order[:round(pairs.off_policy_fraction * n_prompts)].tolist())
    side_a, side_b = [], []
    for i in range(n_prompts):
        opponent = pairs.opponents[i % len(pairs.opponents)]
        if i in off_policy:
            side_a.append(Draw(i, dataclasses.replace(pairs.policy, checkpoint="previous"), "a"))
            side_b.append(Draw(i, dataclasses.replace(opponent, checkpoint="previous"), "b"))
        else:
            side_a.append(Draw(i, pairs.policy, "a"))
            side_b.append(Draw(i, opponent, "b"))
    return side_a, side_b


def rubric_json(prompt: Prompt) -> str:
    return json.dumps([r.to_dict() for r in prompt.rubric])


def judge_pairs(prompts: Sequence[Prompt], images_a: Sequence[Image.Image], images_b: Sequence[Image.Image],
                sources: Sequence[tuple[str, str]], pair_ids: Sequence[str], oracle: PreferenceOracle,
                min_margin: float, *, origin: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, skipped): the oracle's winner and loser per prompt; ties and identical images are skipped."""
    scores_a, scores_b = oracle.score(images_a, prompts), oracle.score(images_b, prompts)
    rows, skipped = [], []
    for pair_id, prompt, a, b, (source_a, source_b), score_a, score_b in zip(
            pair_ids, prompts, images_a, images_b, sources, scores_a, scores_b, strict=True):
        bytes_a, bytes_b = png_bytes(a), png_bytes(b)
        detail = json.dumps({"score_a": score_a, "score_b": score_b, "source_a": source_a, "source_b": source_b})
        verdict = "identical" if bytes_a == bytes_b else judge(score_a, score_b, min_margin)
        if verdict in ("identical", "tie"):
            skipped.append({"pair_id": pair_id, "reason": verdict, "detail": detail})
            continue
        won = verdict == "a"
        rows.append({
            "pair_id": pair_id, "prompt": prompt.text, "rubric": rubric_json(prompt), "width": a.width,
            "height": a.height, "winner": bytes_a if won else bytes_b, "loser": bytes_b if won else bytes_a,
            "winner_source": source_a if won else source_b, "loser_source": source_b if won else source_a,
            "on_policy": source_a.startswith("policy") or source_b.startswith("policy"),
            "winner_score": float(score_a if won else score_b), "loser_score": float(score_b if won else score_a),
            "origin": origin})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def win_rates(pairs: pd.DataFrame) -> dict[str, float]:
    """Per source, the fraction of its pairs it wins (pairs of one source against itself left out)."""
    mixed = pairs[pairs["winner_source"] != pairs["loser_source"]]
    sources = sorted(set(mixed["winner_source"]) | set(mixed["loser_source"]))
    return {f"win_rate.{s}": float((mixed["winner_source"] == s).sum()
                                   / ((mixed["winner_source"] == s) | (mixed["loser_source"] == s)).sum())
            for s in sources}


def pair_grid(pairs: pd.DataFrame) -> Image.Image:
    """Rows of winner | loser for the first few pairs."""
    images = [Image.open(io.BytesIO(row[side])) for _, row in pairs.head(GRID_PAIRS).iterrows()
              for side in ("winner", "loser")]
    return image_grid(images, columns=2)


def write_pairs(pairs: pd.DataFrame, skipped: pd.DataFrame, staging: Path, run: StageRun, name: str) -> None:
    """pairs.parquet, skipped.parquet and samples.png (also logged to MLflow); no pair at all is an error."""
    if pairs.empty:
        reasons = skipped["reason"].value_counts().to_dict()
        raise ValueError(f"{name}: no usable preference pair; every candidate was skipped ({reasons})")
    write_table(pairs, staging / PAIRS_FILE, PreferencePairs)
    write_table(skipped, staging / SKIPPED_FILE, Skipped)
    grid = pair_grid(pairs)
    grid.save(staging / SAMPLES_FILE)
    run.log_image(grid, f"samples/{name}.png")


def skip_counts(skipped: pd.DataFrame) -> dict[str, int]:
    return {f"skipped.{reason}": int(n) for reason, n in skipped["reason"].value_counts().items()}


@dataclass
class PairSettings:
    """Everything sampling and judging depend on (the stage's artifact key with its input checkpoints)."""

    pairs: PairsConfig
    resolution: int
    trainer: RunConfig
    batch: int = BATCH  # batch and chunk decide the call seeds, so they are in the key
    chunk: int = CHUNK


def pair_settings(config: PipelineConfig) -> PairSettings:
    return PairSettings(pairs=config.post.preference.pairs, resolution=config.post.resolution,
                        trainer=config.pretrain.run_config())


def run_pair_generation(inputs: Mapping[str, Path], settings: PairSettings, parent_run_id: str = "", *,
                        root: Path | None = None, oracle: PreferenceOracle | None = None) -> Path:
    """Sample, judge and publish the synthetic preference pairs of ``policy`` (with ``previous`` as the weaker
    checkpoint), judged by ``oracle`` (default: the world's checker)."""
    config, pretrain, resolution = settings.pairs, settings.trainer, settings.resolution
    judge_with = oracle or WorldCheckerOracle()

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        n = config.n_prompts
        prompts = [p for p, _ in sample_prompts(np.random.default_rng(config.seed), n, resolution, resolution)]
        side_a, side_b = plan_draws(config, n)
        pipes = load_pipes(paths["policy"], paths["previous"], pretrain)
        frames = []
        with tqdm(total=2 * n, desc="preference pairs", mininterval=5) as progress:
            for start in range(0, n, settings.chunk):
                a, b = side_a[start:start + settings.chunk], side_b[start:start + settings.chunk]
                images = sample_draws(a + b, [p.text for p in prompts], pipes, resolution=resolution,
                                      shift=pretrain.eval.shift, seed=config.seed, salt=str(start),
                                      batch_size=settings.batch, progress=progress)
                frames.append(judge_pairs(
                    prompts[start:start + settings.chunk], images[:len(a)], images[len(a):],
                    [(x.source, y.source) for x, y in zip(a, b, strict=True)],
                    [f"pair-{x.prompt:06d}" for x in a], judge_with, config.min_margin, origin="synthetic"))
        pairs = pd.concat([f[0] for f in frames], ignore_index=True)
        skipped = pd.concat([f[1] for f in frames], ignore_index=True)
        write_pairs(pairs, skipped, staging, run, PAIRS.name)
        gaps = pairs["winner_score"] - pairs["loser_score"]
        return StageOutput(
            counts={"prompts": n, "pairs": len(pairs), "on_policy": int(pairs["on_policy"].sum()),
                    **skip_counts(skipped)},
            metrics={"on_policy_fraction": float(pairs["on_policy"].mean()), "score_gap": float(gaps.mean()),
                     "winner_score": float(pairs["winner_score"].mean()),
                     "loser_score": float(pairs["loser_score"].mean()), **win_rates(pairs)})

    return execute_stage(PAIRS.name, PAIRS.kind, body, config=keyed(settings, oracle), inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


PAIRS = StageSpec("preference_pairs", "preference_pairs", {"policy": "merge", "previous": "midtrain"}, pair_settings,
                  run_pair_generation)


def read_pairs(artifact: Path) -> pd.DataFrame:
    """The validated pairs table of a preference_pairs artifact."""
    return read_table(Path(artifact) / PAIRS_FILE, PreferencePairs)


def decode_pair_images(rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """(winners, losers) of a batch of pair rows as float tensors in [-1, 1], (B, 3, H, W); every image must be
    its row's width x height and all rows one size."""
    sizes = set(zip(rows["width"], rows["height"], strict=True))
    if len(sizes) > 1:
        raise ValueError(f"a batch of pairs must share one size, got {sorted(sizes)} (pairs {list(rows['pair_id'])})")
    out: dict[str, list[torch.Tensor]] = {"winner": [], "loser": []}
    for _, row in rows.iterrows():
        for side in out:
            image = Image.open(io.BytesIO(row[side])).convert("RGB")
            if image.size != (row["width"], row["height"]):
                raise ValueError(f"pair {row['pair_id']}: {side} image is {image.width}x{image.height}, the row says "
                                 f"{row['width']}x{row['height']}")
            out[side].append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    winners, losers = (torch.stack(out[side]).float() / 127.5 - 1 for side in ("winner", "loser"))
    return winners, losers
