"""Each post-training stage's effect on a base that draws objects, on held-out prompts with 95% CIs.

The default pipeline's base scores near an untrained model on 2 CPU cores (docs/pretraining.md), so its post-training
numbers are noise. This runs the real post-training stages, chained as the pipeline chains them, from a learned
checkpoint ``--init`` (e.g. the 25x first stage of ``learning_curve.py --keep``) at that checkpoint's resolution:
SFT per domain -> merge -> PO on synthetic pairs -> PO calibration on simulated annotations -> the reward model ->
RL (Flow-GRPO without CFG) -> TDM distillation. Midtraining is left out: it needs a curated pool (a pipeline run).
Every evaluation uses ``--prompts`` held-out prompts (each stage's ``eval_prompts`` and the SFT domains'). Writes
``results/<name>.json`` (every stage's metrics and seconds) and ``<name>.md`` (the pipeline's post-training summary
and the issue's targets, each met or not, with the numbers that decide it).

    python benchmarks/post_training_effects.py --init CHECKPOINT [--config overrides.yaml] [--prompts 96]
        [--keep DIR] [--name post_training_effects]
"""

from __future__ import annotations

import _common  # noqa: F401  (first: one thread per process)

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from math import isfinite, nan
from pathlib import Path

from _common import RESULTS_DIR, markdown_table, write_json
from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.config import PipelineConfig, load_config
from krea2_core.post.config import PostTrainConfig
from krea2_core.report import post_training_summary
from krea2_core.stage_spec import run_stage, stage_specs
from krea2_core.tracking import run_metrics
from krea2_core.training.pretrain import EVAL_FILE

# the stages after the domain SFTs, in pipeline order
AFTER_SFT = ("merge", "preference_pairs", "preference_synthetic", "preference_annotations", "preference_calibration",
             "reward_model", "rl", "distill")


def at_resolution(post: PostTrainConfig, resolution: int, prompts: int) -> PostTrainConfig:
    """``post`` with SFT and every sampling stage at ``resolution`` and every evaluation on ``prompts`` prompts."""
    return dataclasses.replace(
        post, resolution=resolution,
        sft=dataclasses.replace(post.sft, stage=dataclasses.replace(post.sft.stage, resolution=resolution),
                                eval_prompts=prompts),
        preference=dataclasses.replace(post.preference, eval_prompts=prompts),
        rl=dataclasses.replace(post.rl, eval_prompts=prompts),
        distill=dataclasses.replace(post.distill, eval_prompts=prompts))


def run_chain(init: Path, config: PipelineConfig) -> tuple[dict[str, Path], dict[str, float]]:
    """The post-training stages from ``init`` in midtraining's place (artifact by stage name, seconds by stage
    name), each run through its StageSpec as the CLI runs it, on the artifacts of the stages its spec names."""
    domains = tuple(config.post.sft.domains)
    specs = stage_specs(domains)
    artifacts: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    produced = {"midtrain": init}
    for stage in (*(s for d in domains for s in (f"sft_data_{d}", f"sft_{d}")), *AFTER_SFT):
        spec = specs[stage]
        inputs = {name: produced[producer] for name, producer in spec.inputs.items() if spec.takes(name, config)}
        began = time.perf_counter()
        produced[stage] = artifacts[stage] = Path(run_stage(spec, config, inputs))
        seconds[stage] = time.perf_counter() - began
    return artifacts, seconds


def targets(metrics: dict[str, dict[str, float]], domains: list[str]) -> list[list[str]]:
    """Issue 18's targets that this chain measures: [target, measured, met]."""
    def m(stage: str, key: str) -> float:
        return metrics.get(stage, {}).get(key, nan)

    def interval(stage: str, key: str, fmt: str = "+.3f") -> str:
        return f"{m(stage, key):{fmt}} [{m(stage, key + '.low'):{fmt}}, {m(stage, key + '.high'):{fmt}}]"

    def row(target: str, measured: str, met: bool) -> list[str]:
        return [target, measured, "yes" if met else "no"]

    rows = []
    for d in domains:
        key = f"vs_base.sft_{d}.{d}.score"
        rows.append(row(f"SFT {d} raises its domain (CI above 0)",
                        interval("merge", key), m("merge", key + ".low") > 0))
        kept = m("merge", f"gain_retained.{d}")
        rows.append(row(f"merge keeps >= 80% of {d}'s gain", f"{kept:.0%}" if isfinite(kept) else "no gain",
                        isfinite(kept) and kept >= 0.8))
        key = f"vs_base.merged.{d}.score"
        rows.append(row(f"merge not below the base on {d} (CI reaches 0 or above)",
                        interval("merge", key), m("merge", key + ".high") >= 0))
    for stage in ("synthetic", "calibration"):
        s = f"preference_{stage}"
        rows.append(row(f"PO {stage}: preferred over its reference (CI above 0.5)",
                        interval(s, "eval.preferred_rate", ".3f"), m(s, "eval.preferred_rate.low") > 0.5))
        rows.append(row(f"PO {stage}: the winner's implicit likelihood stays above the reference's (last training batch)",
                        f"{m(s, 'implicit_loglik.winner'):+.4f}", m(s, "implicit_loglik.winner") >= 0))
    rows.append(row("reward model: held-out accuracy above 0.5 (CI) on >= 64 pairs",
                    f"{interval('reward_model', 'val.accuracy', '.3f')} on {m('reward_model', 'count.val_pairs'):.0f}",
                    m("reward_model", "val.accuracy.low") > 0.5 and m("reward_model", "count.val_pairs") >= 64))
    key = "eval.vs_init_nocfg.score"
    rows.append(row("RL: no-CFG score rises (CI above 0)",
                    interval("rl", key), m("rl", key + ".low") > 0))
    gap = m("rl", "eval.init_cfg.score") - m("rl", "eval.init_nocfg.score")
    closed = m("rl", key) / gap if gap > 0 else nan
    rows.append(row("RL: closes >= half the gap to the start's CFG score",
                    f"{closed:.0%} of {gap:+.3f}" if isfinite(closed) else f"no gap ({gap:+.3f})",
                    isfinite(closed) and closed >= 0.5))
    before, after = m("rl", "eval.diversity.init"), m("rl", "eval.diversity.policy")
    rows.append(row("RL: diversity falls by <= 10%", f"{before:.3f} -> {after:.3f}", after >= 0.9 * before))
    key = "eval.student_vs_teacher.score"
    rows.append(row("TDM: 4-step student without CFG within 0.05 of the CFG teacher (CI)",
                    f"{interval('distill', key)}, {m('distill', 'latency.ratio'):.1f}x faster",
                    m("distill", key + ".low") >= -0.05))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="a learned checkpoint artifact (its eval.json "
                                                                 "gives the resolution)")
    parser.add_argument("--config", default="", help="YAML overrides of the tiny preset (e.g. benchmarks/tiny_long.yaml)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts of every evaluation")
    parser.add_argument("--keep", type=Path, help="keep the output root here (default: a temp dir)")
    parser.add_argument("--name", default="post_training_effects", help="stem of the result files in results/")
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    try:
        read_manifest(args.init, kind="checkpoint")
        resolution = json.loads((args.init / EVAL_FILE).read_text())["resolution"]
    except (ArtifactError, OSError, KeyError, ValueError) as error:
        parser.error(f"--init {args.init}: not a pretraining checkpoint artifact with its {EVAL_FILE} ({error})")
    cfg = load_config("tiny", args.config)
    config = dataclasses.replace(cfg, post=at_resolution(cfg.post, resolution, args.prompts))
    post = config.post
    root = args.keep or Path(tempfile.mkdtemp(prefix="post_training_effects_"))
    os.environ["KREA2_OUTPUT_ROOT"] = str(root)  # run_stage publishes under the output root, as the CLI does
    began = time.perf_counter()
    artifacts, seconds = run_chain(args.init.resolve(), config)
    runs = {stage: read_manifest(path).mlflow_run_id for stage, path in artifacts.items()}
    metrics = {stage: run_metrics(root, run_id) for stage, run_id in runs.items()}
    summary = post_training_summary(root, runs)
    rows = targets(metrics, list(post.sft.domains))
    text = (f"Post-training from `{args.init.name}` at {resolution} px, {args.prompts} held-out prompts per "
            f"evaluation ({time.perf_counter() - began:.0f} s in all).\n\n```\n" + "\n".join(summary) + "\n```\n\n"
            + markdown_table(["target (issue 18)", "measured (95% CI)", "met"], rows) + "\n\n"
            + markdown_table(["stage", "seconds"], [[s, f"{v:.0f}"] for s, v in seconds.items()]) + "\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.md").write_text(text)
    write_json(f"{args.name}.json", {"benchmark": "post_training_effects", "seconds": seconds,
                                     "settings": vars(args) | {"init": str(args.init), "keep": str(args.keep),
                                                               "resolution": resolution},
                                     "metrics": metrics, "summary": summary, "targets": rows})
    print(text)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
