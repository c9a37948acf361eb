"""Held-out prompt following against images seen, on the tiny preset: where learning saturates and what a longer
budget buys. Two runs of the real pretraining stages (2 torchrun processes, as the pipeline runs them):

1. the first stage (32 px) alone, for ``--first-stage-factor`` times its default steps;
2. the whole three-stage schedule at its default budgets.

At ``--evals`` evenly spaced steps of the first stage the live weights are evaluated on the held-out prompts (the
shared evaluator: score, pass rate and per-kind accuracy with 95% CIs); each stage's end is its PMA-merged weights. Data:
each stage's procedural world scenes (``pretrain.stages.<s>.world_scenes``), packed as the pipeline packs them
(the pipeline adds the few hundred curated images of its pool). Writes ``results/<name>.json``, ``<name>.md``,
``<name>.png`` and each run's last sample grid (``<name>_{first_stage,schedule,upper}.png``, the held-out prompts
listed in the .md); ``--name`` defaults to ``learning_curve``. ``--runs`` picks the runs: a long first stage, the
default schedule, or (``upper``) the 512 and 1024 stages from a first-stage checkpoint ``--init``.

    python benchmarks/learning_curve.py [--first-stage-factor 8] [--evals 6] [--config overrides.yaml]
        [--runs first_stage schedule upper] [--init CHECKPOINT] [--name learning_curve]

Stage seconds include the extra learning-curve evaluations (about 13-35 s each), so they overstate the
default run's pretraining time.
"""

from __future__ import annotations

import _common  # noqa: F401  (first: one thread per process)

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from _common import RESULTS_DIR, markdown_table, write_json
from krea2_core.config import load_config
from krea2_core.training.config import PretrainConfig
from krea2_core.evaluation.prompt_following import held_out_prompts
from krea2_core.data.packing import pack_stage, packing_config
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.launch import launch_local
from krea2_core.training.pretrain import EVAL_FILE, TrainingSettings, run_training_stage

KINDS = ("score", "background", "color", "kind", "count", "position", "size", "text")
STAGES = ("256", "512", "1024")


def pack(config: PretrainConfig, stage: str, root: Path) -> Path:
    packing = packing_config(config, stage)
    empty = pd.DataFrame(columns=["id", "uri", "width", "height"])
    captions = pd.DataFrame(columns=["id", "long", "medium", "short"])

    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        return StageOutput(pack_stage(empty, captions, resolution=packing.resolution,
                                      aspect_ratios=packing.aspect_ratios, multiple=packing.multiple,
                                      global_batch=packing.global_batch, seed=packing.seed, out_dir=staging,
                                      world_scenes=packing.world_scenes))

    out, _ = execute_stage(f"pack_{stage}", "packed", body, config=packing, root=root)
    return out


def train(config: PretrainConfig, stages: list[str], evals: int, root: Path, samples: Path,
          init: Path | None = None) -> list[dict[str, object]]:
    """Train ``stages`` in order (each from the previous one, the first from ``init`` if given); every evaluation as
    a row with images seen (``init``'s own included). The last stage's sample grid is saved to ``samples``, 4x
    enlarged."""
    rows: list[dict[str, object]] = []
    seen = 0
    if init is not None:
        previous = json.loads((init / EVAL_FILE).read_text())
        seen = previous["curve"][-1]["step"] * previous["global_batch"]
    for stage in stages:
        recipe = config.stages[stage]
        if stage == STAGES[0]:  # the short upper stages are evaluated at their end only
            config.stages[stage] = dataclasses.replace(recipe, eval_every=max(1, recipe.steps // evals))
        packed = pack(config, stage, root)
        began = time.perf_counter()
        settings = TrainingSettings(f"pretrain_{stage}", config.stages[stage], config.trainer())
        inputs = {"packed": packed, **({"init": init} if init is not None else {})}
        init = launch_local(config.parallel, run_training_stage, inputs, settings, "", root)
        seconds = time.perf_counter() - began
        report = json.loads((init / EVAL_FILE).read_text())
        for point in report["curve"]:
            rows.append({"stage": stage, "resolution": recipe.resolution, "step": point["step"],
                         "images_seen": seen + point["step"] * recipe.global_batch,
                         "weights": "untrained" if point["name"] == "eval.untrained" else
                         "merged" if point["name"] == "eval" else "live", "stage_seconds": seconds,
                         **{k: point[k] for k in KINDS if k in point}})
        seen += recipe.steps * recipe.global_batch
    grid = Image.open(init / "samples.png")
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(samples)
    return rows


def plot(runs: dict[str, list[dict[str, object]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], runs.items(), strict=True):
        for kind in KINDS:
            points = [r for r in rows if kind in r]
            if not points:
                continue
            x = [r["images_seen"] for r in points]
            y = [r[kind]["value"] for r in points]
            line, = ax.plot(x, y, marker="o", markersize=3, label=kind, linewidth=2.5 if kind == "score" else 1.2)
            ax.fill_between(x, [r[kind]["low"] for r in points], [r[kind]["high"] for r in points],
                            color=line.get_color(), alpha=0.12)
        for r in rows:
            if r["weights"] == "merged":
                ax.axvline(r["images_seen"], color="grey", linestyle=":", linewidth=0.8)
        ax.set(title=title, xlabel="images seen", ylabel="held-out accuracy (95% CI)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict[str, object]]) -> str:
    body = [[r["stage"], r["resolution"], r["weights"], r["step"], r["images_seen"],
             *[f"{r[k]['value']:.3f} [{r[k]['low']:.2f}, {r[k]['high']:.2f}]" if k in r else "n/a" for k in KINDS]]
            for r in rows]
    return markdown_table(["stage", "px", "weights", "step", "images seen", *KINDS], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first-stage-factor", type=float, default=8.0)
    parser.add_argument("--evals", type=int, default=6, help="evaluations in the first stage (plus each stage's end)")
    parser.add_argument("--config", default="", help="YAML overrides of the tiny preset")
    parser.add_argument("--keep", type=Path, help="keep the runs' output root here (default: a temp dir)")
    parser.add_argument("--runs", nargs="+", choices=["first_stage", "schedule", "upper"],
                        default=["first_stage", "schedule"],
                        help="first_stage: the first stage at --first-stage-factor; schedule: the default three "
                             "stages; upper: the 512 and 1024 stages at their default budgets from --init")
    parser.add_argument("--init", type=Path, help="for 'upper': a first-stage checkpoint artifact (e.g. a long "
                                                  "first stage's, kept with --keep)")
    parser.add_argument("--name", default="learning_curve", help="stem of the result files in results/")
    args = parser.parse_args()
    if ("upper" in args.runs) != (args.init is not None):
        parser.error("--init goes with --runs upper, and --runs upper needs --init")
    base = load_config("tiny", args.config).pretrain
    root = args.keep or Path(tempfile.mkdtemp(prefix="learning_curve_"))
    runs = {}
    began = time.perf_counter()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    grids = []
    if "first_stage" in args.runs:
        long = dataclasses.replace(base, stages=dict(base.stages))
        first = long.stages["256"]
        long.stages["256"] = dataclasses.replace(first, steps=round(first.steps * args.first_stage_factor))
        runs[f"first stage alone, {args.first_stage_factor:g}x its steps"] = train(
            long, ["256"], args.evals, root / "first_stage", RESULTS_DIR / f"{args.name}_first_stage.png")
        grids.append(f"`{args.name}_first_stage.png`")
    if "schedule" in args.runs:
        runs["three-stage schedule (default budgets)"] = train(
            dataclasses.replace(base, stages=dict(base.stages)), list(STAGES), args.evals, root / "schedule",
            RESULTS_DIR / f"{args.name}_schedule.png")
        grids.append(f"`{args.name}_schedule.png`")
    if "upper" in args.runs:
        runs[f"512 and 1024 stages (default budgets) from checkpoint {args.init.name}"] = train(
            dataclasses.replace(base, stages=dict(base.stages)), list(STAGES[1:]), args.evals, root / "upper",
            RESULTS_DIR / f"{args.name}_upper.png", init=args.init)
        grids.append(f"`{args.name}_upper.png`")
    plot(runs, RESULTS_DIR / f"{args.name}.png")
    prompts = [p.text for p in held_out_prompts(base.eval, base.stages["256"].resolution)[:base.eval.grid_size]]
    text = "\n\n".join(f"### {title}\n\n{table(rows)}" for title, rows in runs.items())
    text += f"\n\nSample grids ({', '.join(grids)}; row by row):\n\n"
    text += "\n".join(f"{i + 1}. {prompt}" for i, prompt in enumerate(prompts))
    (RESULTS_DIR / f"{args.name}.md").write_text(text + "\n")
    write_json(f"{args.name}.json", {"benchmark": "learning_curve", "seconds": time.perf_counter() - began,
                                       "settings": vars(args) | {"keep": str(args.keep)}, "runs": runs,
                                       "sample_prompts": prompts})
    print(text)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
