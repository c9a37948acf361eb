"""``krea2 report``: a pipeline run as one table: each stage's run (a cache hit shows the run that computed it), its
wall time and the headline metrics a reader of that stage looks at first. README's measured tables come from it."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.evaluation.stats import format_metric
from krea2_core.rerun import RerunError, stage_runs

# (stage name pattern, metric key patterns), first matching stage pattern wins
HEADLINES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("world_pool", ("count.files",)),
    ("selection", ("count.*.kept",)),
    ("captioning", ("count.images", "count.source.text_llm")),
    ("semantic_selection", ("count.input", "count.sampled")),
    ("pack_*", ("count.packed",)),
    ("sft_data_*", ("count.packed",)),
    ("pretrain_256", ("eval.vs_untrained.score", "eval.kind", "eval.count", "final.val_loss", "images_per_s")),
    ("pretrain_*", ("eval.vs_previous.score", "eval.vs_untrained.score", "eval.kind", "eval.count", "final.val_loss",
                    "images_per_s")),
    ("midtrain", ("eval.score", "final.val_loss")),
    ("sft_*", ("eval.score", "final.val_loss")),
    ("merge", ("eval.*.score",)),
    ("preference_pairs", ("count.pairs", "winner_score", "loser_score")),
    ("preference_annotations", ("count.pairs",)),
    ("preference_*", ("eval.preferred_rate", "eval.policy.score", "eval.reference.score")),
    ("reward_model", ("train.accuracy", "val.accuracy")),
    ("rl", ("eval.init_cfg.score", "eval.init_nocfg.score", "eval.policy_nocfg.score", "eval.diversity.*")),
    ("distill", ("eval.teacher.score", "eval.teacher_few_step.score", "eval.student.score", "latency.ratio")),
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
