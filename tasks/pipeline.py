"""Tasks that frame a pipeline execution: resolve the config, open and close the MLflow parent run."""

from __future__ import annotations

import json
from math import isfinite, nan
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig, load_config
from krea2_core.evaluation.prompt_following import REPORT_KINDS
from krea2_core.evaluation.stats import format_metric
from krea2_core.stages import output_root
from krea2_core.tracking import end_pipeline_run, run_metrics, start_pipeline_run
from tasks.common import from_flyte_dir


@task(container_image=DATA_IMAGE)
def resolve_config(preset: str, overrides: str) -> PipelineConfig:
    """Preset + YAML overrides (a file path or inline YAML). Not cached: it is cheap, and the values
    it returns, not the file name, are what the stage caches key on."""
    return load_config(preset, overrides)


@task(container_image=DATA_IMAGE)
def start_pipeline(config: PipelineConfig) -> str:
    return start_pipeline_run(output_root(), config.preset, config)


def pretraining_summary(root: Path, stage_runs: dict[str, str]) -> list[str]:
    """Held-out prompt following (world checker, 95% CIs, paired by prompt) after each resolution stage, against the
    stage before it and against the untrained model."""
    lines = []
    for stage in ("256", "512", "1024"):
        run_id = stage_runs.get(f"pretrain_{stage}")
        if run_id is None:
            continue
        metrics = run_metrics(root, run_id)
        lines.append(f"    after {stage:>5} : " + ", ".join(
            f"{kind} {format_metric(f'eval.{kind}', metrics)}" for kind in ("score", *REPORT_KINDS[:5])
            if f"eval.{kind}" in metrics))
        for versus in ("previous", "untrained"):
            if f"eval.vs_{versus}.score" in metrics:
                lines.append(f"      vs {versus:<9}: score {format_metric(f'eval.vs_{versus}.score', metrics)}")
    return lines


def post_training_summary(root: Path, stage_runs: dict[str, str]) -> list[str]:
    """Midtraining, each SFT domain against its base and the merge, and preference optimisation's preferred-rate
    over its reference (all scored by the world checker on held-out prompts)."""
    lines = []
    if "midtrain" in stage_runs:
        score = run_metrics(root, stage_runs["midtrain"]).get("eval.score", float("nan"))
        lines.append(f"    midtraining   : prompt-following {score:.3f}")
    if "merge" in stage_runs:
        merge = run_metrics(root, stage_runs["merge"])
        for domain in sorted({key.split(".")[-1] for key in merge if key.startswith("score.base.")}):
            kept = merge.get(f"gain_retained.{domain}", nan)  # NaN when the SFT did not raise its domain's score
            lines.append(f"    SFT {domain:<9} : domain score base {merge[f'score.base.{domain}']:.3f} -> SFT "
                         f"{merge.get(f'score.sft_{domain}.{domain}', nan):.3f}; "
                         + (f"the merge keeps {kept:.0%} of the gain" if isfinite(kept) else "no gain to keep"))
    for stage in ("synthetic", "calibration"):
        if f"preference_{stage}" in stage_runs:
            metrics = run_metrics(root, stage_runs[f"preference_{stage}"])
            lines.append(f"    PO {stage:<10} : preferred over its reference "
                         f"{metrics.get('eval.preferred_rate', nan):.2f} of held-out prompts")
    if "rl" in stage_runs:
        rl = run_metrics(root, stage_runs["rl"])
        lines.append(f"    RL (no CFG)   : prompt-following without CFG {rl.get('eval.init_nocfg.score', nan):.3f} -> "
                     f"{rl.get('eval.policy_nocfg.score', nan):.3f} (the start with CFG: "
                     f"{rl.get('eval.init_cfg.score', nan):.3f}); diversity {rl.get('eval.diversity.init', nan):.3f} "
                     f"-> {rl.get('eval.diversity.policy', nan):.3f}")
    if "distill" in stage_runs:
        tdm = run_metrics(root, stage_runs["distill"])
        lines.append(f"    distilled     : student without CFG {tdm.get('eval.student.score', nan):.3f} vs teacher "
                     f"with CFG {tdm.get('eval.teacher.score', nan):.3f} (teacher at the student's steps "
                     f"{tdm.get('eval.teacher_few_step.score', nan):.3f}), {tdm.get('latency.ratio', nan):.1f}x faster")
    return lines


def expander_summary(root: Path, stage_runs: dict[str, str]) -> list[str]:
    """Held-out short user prompts: the checker's score of images from the raw prompt vs its expansions, and the
    expansions' faithfulness and group diversity (SFT vs RL)."""
    if "expander_rl" not in stage_runs:
        return []
    m = run_metrics(root, stage_runs["expander_rl"])
    return [f"    expansion     : prompt-following raw prompt {m.get('eval.raw.score', nan):.3f}, SFT expansion "
            f"{m.get('eval.sft.score', nan):.3f}, RL expansion {m.get('eval.rl.score', nan):.3f}; faithfulness SFT "
            f"{m.get('eval.sft.faithfulness', nan):.2f} / RL {m.get('eval.rl.faithfulness', nan):.2f}; diversity SFT "
            f"{m.get('eval.sft.diversity', nan):.3f} / RL {m.get('eval.rl.diversity', nan):.3f}"]


@task(container_image=DATA_IMAGE)
def finish_pipeline(parent_run_id: str, curated: FlyteDirectory, midtrain: FlyteDirectory,
                    pretrained: FlyteDirectory, final: FlyteDirectory, distilled: FlyteDirectory,
                    expander: FlyteDirectory) -> str:
    """Close the parent run, linking every stage run behind the outputs, and say where things are."""
    root = output_root()
    curated_path, midtrain_path = from_flyte_dir(curated), from_flyte_dir(midtrain)
    pretrained_path, final_path = from_flyte_dir(pretrained), from_flyte_dir(final)
    distilled_path, expander_path = from_flyte_dir(distilled), from_flyte_dir(expander)
    finals = [read_manifest(midtrain_path, kind="midtrain_selection"), read_manifest(final_path, kind="checkpoint"),
              read_manifest(distilled_path, kind="checkpoint"), read_manifest(expander_path, kind="expander")]
    stage_runs = end_pipeline_run(root, parent_run_id, [m.mlflow_run_id for m in finals])
    summary = json.loads((curated_path / "summary.json").read_text())
    sampling = json.loads((distilled_path / "distill.json").read_text())
    selection = json.loads((midtrain_path / "summary.json").read_text())
    lines = [
        "krea2 pipeline finished",
        f"  curated data : {curated_path}",
        *[f"    stage {stage:>4}: kept {summary[stage]['kept']} of {summary[stage]['total']}"
          for stage in sorted(summary, key=lambda s: (len(s), s))],
        f"  midtraining  : {midtrain_path}",
        f"    sampled {selection['sampled']} of {selection['input']} ({selection['added_for_coverage']} added for "
        f"entity coverage; {selection['concepts_in_input']} concepts, {selection['concepts_lost']} lost); "
        f"plots: cluster_sizes.png, tag_counts.png",
        f"  pretrained   : {pretrained_path} (a diffusers Krea2Transformer2DModel directory, train state, "
        f"samples.png)",
        *pretraining_summary(root, stage_runs),
        f"  final model  : {final_path} (post-trained: midtraining, SFT + merge, preference optimisation, RL)",
        f"  distilled    : {distilled_path} ({sampling['student_steps']}-step student without CFG: distill.json)",
        *post_training_summary(root, stage_runs),
        f"  expander     : {expander_path} (a transformers LLM: krea2 expand --model <it> \"a red circle\")",
        *expander_summary(root, stage_runs),
        f"  MLflow       : parent run {parent_run_id}; stage runs {stage_runs}",
        f"  browse with  : mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}",
    ]
    return "\n".join(lines)
