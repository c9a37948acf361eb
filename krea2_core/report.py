"""``krea2 report``: a pipeline run as one table: each stage's run (a cache hit shows the run that computed it), its
wall time and the headline metrics a reader of that stage looks at first. README's measured tables come from it.
Also the pipeline's closing summary (``pipeline_summary``): where its outputs are, what curation kept and the
held-out effect of each training stage, in sentences."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from math import isfinite, nan
import json
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.common.layout import SUMMARY_FILE
from krea2_core.evaluation.prompt_following import REPORT_KINDS
from krea2_core.evaluation.stats import format_metric
from krea2_core.post.distill import DISTILL_FILE
from krea2_core.rerun import RerunError, stage_runs
from krea2_core.tracking import run_metrics

# (stage name pattern, metric key patterns), first matching stage pattern wins
HEADLINES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("world_pool", ("count.files",)),
    ("selection_*", ("count.kept", "count.total")),
    ("captioning_*", ("count.images", "count.computed", "count.reused", "count.source.text_llm")),
    ("semantic_selection", ("count.input", "count.sampled")),
    ("pack_*", ("count.packed",)),
    ("sft_data_*", ("count.packed",)),
    ("pretrain_256", ("eval.vs_untrained.score", "eval.kind", "eval.count", "final.val_loss", "images_per_s")),
    ("pretrain_*", ("eval.vs_previous.score", "eval.vs_untrained.score", "eval.kind", "eval.count", "final.val_loss",
                    "images_per_s")),
    ("midtrain", ("eval.score", "final.val_loss")),
    ("sft_*", ("eval.score", "final.val_loss")),
    ("merge", ("vs_base.*.score",)),
    ("preference_pairs", ("count.pairs", "winner_score", "loser_score")),
    ("preference_annotations", ("count.pairs",)),
    ("preference_*", ("eval.preferred_rate", "eval.vs_reference.score")),
    ("reward_model", ("val.accuracy", "count.val_pairs", "train.accuracy")),
    ("rl", ("eval.vs_init_nocfg.score", "eval.vs_init_cfg.score", "eval.diversity.*")),
    ("distill", ("eval.student_vs_teacher.score", "eval.student_vs_teacher_few_step.score", "latency.ratio")),
    ("expander_data", ("count.pairs", "fallback_rate.user")),
    ("expander_sft", ("val.loss_before", "val.loss_after", "eval.sft.well_formed", "eval.sft.faithfulness",
                      "eval.sft.gate_pass")),
    ("expander_rl", ("eval.*.score", "eval.*.faithfulness", "eval.*.diversity")),
)


@dataclass(frozen=True)
class StageRow:
    stage: str
    run_id: str
    status: str
    seconds: float | None  # None while the run has not ended
    metrics: dict[str, str]  # headline metric -> its value as text (with its CI, or as a paired change)


def headline(stage: str, metrics: dict[str, float]) -> dict[str, str]:
    """The metrics of ``HEADLINES`` for ``stage``, in pattern order (matches of one pattern sorted by key), each
    formatted with its interval or as ``a -> b (diff, 95% CI)`` where the run logged those."""
    patterns = next((keys for pattern, keys in HEADLINES if fnmatchcase(stage, pattern)), ())
    shown: dict[str, str] = {}
    for pattern in patterns:
        shown.update({key: format_metric(key, metrics) for key in sorted(metrics) if fnmatchcase(key, pattern)})
    return shown


def _row(stage: str, run: Run) -> StageRow:
    end = run.info.end_time
    seconds = (end - run.info.start_time) / 1000 if end else None
    return StageRow(stage, run.info.run_id, run.info.status, seconds, headline(stage, run.data.metrics))


def latest_pipeline_run() -> str:
    """The newest pipeline run of the configured tracking store."""
    client = MlflowClient()
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`krea2.kind` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise RerunError("no pipeline run in this tracking store (run the pipeline first, or name a run id)")
    return found[0].info.run_id


def stage_report(run_id: str) -> list[StageRow]:
    """A row per stage behind ``run_id`` (a pipeline run, or a stage run and its upstream), in execution order."""
    runs = stage_runs(run_id)
    if not runs:
        raise RerunError(f"run {run_id} names no stage run (a pipeline run that has not finished?)")
    return [_row(stage, run) for stage, run in sorted(runs.items(), key=lambda item: item[1].info.start_time)]


def format_report(rows: list[StageRow]) -> str:
    """A Markdown table (stage, seconds, headline metrics) and the stages' total time."""
    lines = ["| stage | seconds | headline metrics |", "|---|---:|---|"]
    for row in rows:
        seconds = f"{row.seconds:.0f}" if row.seconds is not None else row.status.lower()
        metrics = ", ".join(f"{key} {value}" for key, value in row.metrics.items())
        lines.append(f"| {row.stage} | {seconds} | {metrics} |")
    total = sum(row.seconds or 0.0 for row in rows)
    lines.append(f"\n{len(rows)} stages, {total:.0f} s in their runs ({total / 60:.1f} min)")
    return "\n".join(lines)


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
    """Midtraining, each SFT domain and the merge against the base, preference optimisation's preferred-rate over its
    reference, the reward model's held-out accuracy, RL without CFG and the distilled student against its teacher:
    world-checker scores on held-out prompts, paired changes with 95% CIs."""
    lines = []
    if "midtrain" in stage_runs:
        lines.append(f"    midtraining   : prompt-following "
                     f"{format_metric('eval.score', run_metrics(root, stage_runs['midtrain']))}")
    if "merge" in stage_runs:
        merge = run_metrics(root, stage_runs["merge"])
        for domain in sorted({key.split(".")[-1] for key in merge if key.startswith("score.base.")}):
            kept = merge.get(f"gain_retained.{domain}", nan)  # NaN when the SFT did not raise its domain's score
            lines.append(f"    SFT {domain:<9} : domain score {format_metric(f'vs_base.sft_{domain}.{domain}.score', merge)}; "
                         f"merged {format_metric(f'vs_base.merged.{domain}.score', merge)}, "
                         + (f"{kept:.0%} of the gain kept" if isfinite(kept) else "no gain to keep"))
    for stage in ("synthetic", "calibration"):
        if f"preference_{stage}" in stage_runs:
            metrics = run_metrics(root, stage_runs[f"preference_{stage}"])
            lines.append(f"    PO {stage:<11}: preferred over its reference on "
                         f"{format_metric('eval.preferred_rate', metrics)} of held-out prompts; score "
                         f"{format_metric('eval.vs_reference.score', metrics)}")
    if "reward_model" in stage_runs:
        reward = run_metrics(root, stage_runs["reward_model"])
        if "val.accuracy" in reward:
            lines.append(f"    reward model  : held-out pairwise accuracy {format_metric('val.accuracy', reward)} "
                         f"on {reward.get('count.val_pairs', nan):.0f} pairs")
    if "rl" in stage_runs:
        rl = run_metrics(root, stage_runs["rl"])
        lines.append(f"    RL (no CFG)   : prompt-following without CFG {format_metric('eval.vs_init_nocfg.score', rl)}; "
                     f"the start with CFG {rl.get('eval.init_cfg.score', nan):.3f}; diversity "
                     f"{rl.get('eval.diversity.init', nan):.3f} -> {rl.get('eval.diversity.policy', nan):.3f}")
    if "distill" in stage_runs:
        tdm = run_metrics(root, stage_runs["distill"])
        lines.append(f"    distilled     : teacher with CFG -> student without CFG "
                     f"{format_metric('eval.student_vs_teacher.score', tdm)} (teacher at the student's steps "
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


def pipeline_summary(root: Path, parent_run_id: str, stage_runs: dict[str, str], outputs: Mapping[str, Path]) -> str:
    """The closing message of a pipeline run: where each output artifact is (``outputs``: curated_<stage> per
    resolution stage, midtrain, pretrained, final, distilled, expander), what curation kept, each training stage's
    held-out effect, and where the MLflow runs are (``stage_runs``: stage -> run id)."""
    curated = {name.removeprefix("curated_"): (path, json.loads((path / SUMMARY_FILE).read_text()))
               for name, path in outputs.items() if name.startswith("curated_")}
    selection = json.loads((outputs["midtrain"] / SUMMARY_FILE).read_text())
    sampling = json.loads((outputs["distilled"] / DISTILL_FILE).read_text())
    return "\n".join([
        "krea2 pipeline finished",
        "  curated data :",
        *[f"    stage {stage:>4}: kept {kept['kept']} of {kept['total']}: {path}"
          for stage, (path, kept) in sorted(curated.items(), key=lambda item: (len(item[0]), item[0]))],
        f"  midtraining  : {outputs['midtrain']}",
        f"    sampled {selection['sampled']} of {selection['input']} ({selection['added_for_coverage']} added for "
        f"entity coverage; {selection['concepts_in_input']} concepts, {selection['concepts_lost']} lost); "
        f"plots: cluster_sizes.png, tag_counts.png",
        f"  pretrained   : {outputs['pretrained']} (a diffusers Krea2Transformer2DModel directory, train state, "
        f"samples.png)",
        *pretraining_summary(root, stage_runs),
        f"  final model  : {outputs['final']} (post-trained: midtraining, SFT + merge, preference optimisation, RL)",
        f"  distilled    : {outputs['distilled']} ({sampling['student_steps']}-step student without CFG: "
        f"{DISTILL_FILE})",
        *post_training_summary(root, stage_runs),
        f"  expander     : {outputs['expander']} (a transformers LLM: krea2 expand --model <it> \"a red circle\")",
        *expander_summary(root, stage_runs),
        f"  MLflow       : parent run {parent_run_id}; stage runs {stage_runs}",
        f"  browse with  : mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}",
    ])
