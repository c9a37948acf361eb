"""Model merging of the domain SFT checkpoints into one generalist checkpoint, with the evaluation that shows
what merging keeps: every candidate (the base, each domain's SFT, each merge method) is scored by the world's
checker on every domain's held-out prompts.

``gain_retained.<domain>`` = (merged - base) / (domain SFT - base) on that domain's prompts: 1 keeps all of the
domain's SFT gain, 0 none of it (undefined where the SFT did not beat the base). ``vs_base.<candidate>.<domain>.score``
is a candidate's score minus the base's on a domain's prompts, paired by prompt, with its 95% CI (``.low``/``.high``);
the published merge is the candidate ``merged``.

Artifact (kind ``checkpoint``): the merged weights (``MergeConfig.method``) in the diffusers layout,
``eval.json`` (the candidate x domain score matrix) and ``samples.png`` (the merged model on each domain).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, get_args, get_type_hints

import torch

from krea2_core.common.layout import EVAL_FILE
from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig
from krea2_core.post.config import MergeConfig
from krea2_core.training.config import RunConfig
from krea2_core.world.config import SceneDomainConfig
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.image_model import ModelIndex, load_text_to_image, new_model
from krea2_core.training.merging import merge_checkpoints
from krea2_core.evaluation.prompt_following import PromptFollowing, comparison_metrics, eval_sampler, evaluate, \
    held_out_prompts, image_grid

METHODS: tuple[str, ...] = get_args(get_type_hints(MergeConfig)["method"])


@dataclass
class MergeSettings:
    """What the merge stage depends on: the merge recipe, each domain's evaluation scenes and the evaluation."""

    merge: MergeConfig
    domains: dict[str, SceneDomainConfig]  # SFT domain -> the scenes its held-out prompts are drawn from
    eval_prompts: int  # held-out prompts per domain
    resolution: int
    trainer: RunConfig


def merge_settings(config: PipelineConfig) -> MergeSettings:
    post = config.post
    return MergeSettings(merge=post.merge, domains={name: d.scenes for name, d in post.sft.domains.items()},
                         eval_prompts=post.sft.eval_prompts, resolution=post.resolution,
                         trainer=config.pretrain.run_config())


def _score_matrix(pipe: TextToImage, candidates: dict[str, Path], settings: MergeSettings, device: torch.device,
                  run: StageRun
                  ) -> tuple[dict[str, dict[str, PromptFollowing]], dict[str, list]]:
    """{candidate: {domain: checker results}} and each candidate's images per domain (for the grids)."""
    scores: dict[str, dict[str, PromptFollowing]] = {}
    images: dict[str, list] = {}
    for candidate, weights in candidates.items():
        model = dataclasses.replace(pipe, model=new_model(weights, device, seed=settings.trainer.seed).eval())
        scores[candidate] = {}
        for domain_name, scenes in settings.domains.items():
            eval_cfg = dataclasses.replace(settings.trainer.eval, scenes=scenes, n_prompts=settings.eval_prompts)
            prompts = held_out_prompts(eval_cfg, settings.resolution)
            result, generated = evaluate(eval_sampler(model, eval_cfg, settings.resolution), prompts)
            scores[candidate][domain_name] = result
            images[f"{candidate}/{domain_name}"] = generated
            run.log_metrics(result.metrics(f"eval.{candidate}.{domain_name}"))
    return scores, images


def run_merge(inputs: Mapping[str, Path], settings: MergeSettings, parent_run_id: str = "", *,
              root: Path | None = None) -> Path:
    """Merge the domain checkpoints ``sft.<domain>`` over ``base`` (the checkpoint they were finetuned from) with
    ``settings.merge``, and evaluate base, each domain and each merge method on each domain."""
    if set(inputs) != {"base", *(f"sft.{name}" for name in settings.domains)}:
        raise ValueError(f"merge needs a base and one SFT checkpoint per configured domain {sorted(settings.domains)}, "
                         f"got {sorted(inputs)}")
    for path in inputs.values():
        read_manifest(path, kind="checkpoint")
    index = ModelIndex.read(inputs["base"])
    for key, path in inputs.items():
        if ModelIndex.read(path) != index:
            raise ValueError(f"merge: {key} ({path}) is another model than base ({inputs['base']}): merging averages "
                             "the weights of one model")
    trainer = settings.trainer
    device = torch.device(trainer.parallel.device if trainer.parallel.device != "cuda" else "cuda:0")

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        domains = {name: paths[f"sft.{name}"] for name in settings.domains}
        methods = METHODS if settings.merge.compare else (settings.merge.method,)
        candidates = {"base": paths["base"], **{f"sft_{name}": path for name, path in domains.items()}}
        stats: dict[str, float] = {}
        for method in methods:
            out = staging if method == settings.merge.method else run.work_dir / method
            out.mkdir(parents=True, exist_ok=True)
            merged = merge_checkpoints(paths["base"], domains, dataclasses.replace(settings.merge, method=method),
                                       out / DIFFUSERS_WEIGHTS_FILE)
            index.write(out)  # a checkpoint directory that describes itself, published or scored
            stats.update({f"merge.{method}.{k}": v for k, v in merged.items()})
            candidates[f"merged_{method}"] = out
        pipe = load_text_to_image(paths["base"], trainer.parallel, device, seed=trainer.seed)
        results, images = _score_matrix(pipe, candidates, settings, device, run)
        scores = {c: {d: result.score for d, result in row.items()} for c, row in results.items()}
        chosen = f"merged_{settings.merge.method}"
        metrics = {f"score.{c}.{d}": s for c, row in scores.items() for d, s in row.items()}
        for candidate, row in results.items():
            if candidate == "base":
                continue
            name = "merged" if candidate == chosen else candidate  # the published merge
            for domain, result in row.items():
                metrics.update(comparison_metrics(results["base"][domain], result, f"vs_base.{name}.{domain}"))
        for name in domains:
            gain = scores[f"sft_{name}"][name] - scores["base"][name]
            for method in methods:
                kept = scores[f"merged_{method}"][name] - scores["base"][name]
                metrics[f"gain_retained.{method}.{name}"] = kept / gain if gain > 0 else math.nan
            metrics[f"gain_retained.{name}"] = metrics[f"gain_retained.{settings.merge.method}.{name}"]
        metrics.update(stats)
        (staging / EVAL_FILE).write_text(json.dumps({"scores": scores, "method": settings.merge.method}, indent=2))
        grid = image_grid([image for name in domains for image in images[f"{chosen}/{name}"][:4]])
        grid.save(staging / "samples.png")
        run.log_image(grid, "samples/merged.png")
        return StageOutput(counts={"domains": len(domains), "methods_compared": len(methods)}, metrics=metrics)

    return execute_stage(MERGE_STAGE, "checkpoint", body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


MERGE_STAGE = "merge"


def merge_spec(domains: tuple[str, ...]) -> StageSpec:
    """``merge``: the midtraining checkpoint and one SFT checkpoint per domain."""
    return StageSpec(MERGE_STAGE, "checkpoint", {"base": "midtrain", **{f"sft.{d}": f"sft_{d}" for d in domains}},
                     merge_settings, run_merge)
