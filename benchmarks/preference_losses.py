"""Diffusion-DPO against STPO from one init checkpoint on one preference-pairs artifact: does STPO stop the policy
divergence (both likelihoods falling) and what does it cost in preference?

Both losses train in this process (one rank, no MLflow, no artifact) with ``train_preference``, from the same init,
on the same batches, noise and timesteps (all seeded by step), with the preset's PO stage settings (``--stage``;
``--steps`` / ``--lr`` override them) and loss hyperparameters (only ``kind`` differs). Then both generate the
held-out prompts (``post.preference.eval_prompts``, the preset's sampler settings) from the same noise as the
reference (the init), and the world checker judges.

Per loss: the implicit log-likelihood ratios log p_θ/p_ref = -β Δ (logit units) of winner and loser, the mean over
the last ``--tail`` steps ("final") and the winner's lowest per-step value over training ("min winner"); the
margin and accuracy over the same tail; the checker-oracle's preferred rate of the policy over the reference
(0.5 = no better) and the checker score of both.

    python benchmarks/preference_losses.py --pairs ARTIFACT --init ARTIFACT [--steps 60] [--out result.json]
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from krea2_core.config import PipelineConfig
from krea2_core.post.preference import (compare_with_reference, load_pairs, policy_and_reference, preference_settings,
                                        train_preference)
from krea2_core.presets import preset
from krea2_core.training.parallel import init_distributed

KINDS = ("dpo", "stpo")


def run(kind: str, config: PipelineConfig, args: argparse.Namespace) -> dict[str, object]:
    settings = preference_settings(config, args.stage)  # what the pipeline's PO stage would train with
    trainer, stage = settings.trainer, settings.recipe
    stage = dataclasses.replace(stage, steps=args.steps or stage.steps, lr=args.lr or stage.lr)
    env = init_distributed(trainer.parallel.device)
    pipe, reference = policy_and_reference(trainer, args.init, env)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    train_preference(pipe, reference, load_pairs(args.pairs, args.resolution),
                     dataclasses.replace(settings.loss, kind=kind), stage, trainer, env,
                     timestep_shift=args.timestep_shift,
                     log=lambda step, metrics: curve.append({"step": step, **metrics}))
    seconds = time.perf_counter() - start
    pipe.model.eval()
    eval_config = dataclasses.replace(trainer.eval, n_prompts=args.eval_prompts or settings.eval_prompts)
    metrics, _, _ = compare_with_reference(pipe, dataclasses.replace(pipe, model=reference), eval_config,
                                           args.resolution)
    tail = curve[-args.tail:]

    def mean(key: str) -> float:
        return float(np.mean([c[key] for c in tail]))

    return {"loss": kind, "final_winner": mean("implicit_loglik.winner"), "final_loser": mean("implicit_loglik.loser"),
            "min_winner": min(c["implicit_loglik.winner"] for c in curve), "final_margin": mean("margin"),
            "final_accuracy": mean("accuracy"), "preferred_rate": metrics["eval.preferred_rate"],
            "policy_score": metrics["eval.policy.score"], "reference_score": metrics["eval.reference.score"],
            "s_per_step": seconds / len(curve), "steps": stage.steps, "lr": stage.lr, "eval": metrics,
            "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="preference_pairs artifact directory")
    parser.add_argument("--init", type=Path, required=True, help="checkpoint artifact directory (policy = reference)")
    parser.add_argument("--preset", default="tiny", help="config preset the checkpoint was trained with")
    parser.add_argument("--stage", choices=("synthetic", "calibration"), default="synthetic")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the stage's)")
    parser.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the stage's)")
    parser.add_argument("--resolution", type=int, default=0, help="pair resolution (default: post.resolution)")
    parser.add_argument("--timestep-shift", type=float, default=0.0,
                        help="training timestep shift (default: the SFT stage's)")
    parser.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts (default: the preset's)")
    parser.add_argument("--tail", type=int, default=5, help="steps averaged for the final values")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results (with the curves) to this JSON file")
    args = parser.parse_args()
    config = preset(args.preset)
    settings = preference_settings(config, args.stage)
    args.resolution = args.resolution or settings.resolution
    args.timestep_shift = args.timestep_shift or settings.timestep_shift
    torch.set_num_threads(args.threads)

    results = [run(kind, config, args) for kind in KINDS]
    headers = ["loss", "final winner", "final loser", "min winner", "final margin", "accuracy", "preferred rate",
               "policy score", "reference score", "s/step"]
    keys = ["loss", "final_winner", "final_loser", "min_winner", "final_margin", "final_accuracy", "preferred_rate",
            "policy_score", "reference_score", "s_per_step"]
    print(f"\n{results[0]['steps']} steps at lr {results[0]['lr']:g}; implicit log-likelihood ratios -βΔ in logit "
          f"units, final = mean of the last {args.tail} steps\n")
    print(_common.markdown_table(headers, [[r[k] for k in keys] for r in results]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": _common.command_line(), "git": _common.git_revision(), "machine": _common.machine_info(),
            "pairs": str(args.pairs), "init": str(args.init), "preset": args.preset, "stage": args.stage,
            "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
