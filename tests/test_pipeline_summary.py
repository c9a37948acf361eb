"""The pipeline's closing summary: where each output is, what curation kept, and each post-training effect as a
paired change or a rate with its 95% CI."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from krea2_core.common.layout import SUMMARY_FILE
from krea2_core.post.distill import DISTILL_FILE
from krea2_core.report import pipeline_summary, post_training_summary
from krea2_core.tracking import configure_tracking


def _change(key: str, before: float, after: float, low: float, high: float) -> dict[str, float]:
    return {key: after - before, f"{key}.low": low, f"{key}.high": high, f"{key}.before": before,
            f"{key}.after": after}


def _run(experiment: str, metrics: dict[str, float]) -> str:
    client = MlflowClient()
    run_id = client.create_run(experiment).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    return run_id


def test_post_training_summary_states_every_effect_with_its_interval(isolated_outputs: Path) -> None:
    experiment = configure_tracking(isolated_outputs)
    runs = {
        "merge": _run(experiment, {"score.base.warm": 0.40, "gain_retained.warm": 0.9,
                                   **_change("vs_base.sft_warm.warm.score", 0.40, 0.50, 0.05, 0.15),
                                   **_change("vs_base.merged.warm.score", 0.40, 0.49, 0.04, 0.14)}),
        "preference_synthetic": _run(experiment, {"eval.preferred_rate": 0.62, "eval.preferred_rate.low": 0.55,
                                                  "eval.preferred_rate.high": 0.69,
                                                  **_change("eval.vs_reference.score", 0.5, 0.55, 0.01, 0.09)}),
        "reward_model": _run(experiment, {"val.accuracy": 0.7, "val.accuracy.low": 0.59, "val.accuracy.high": 0.81,
                                          "count.val_pairs": 64}),
        "rl": _run(experiment, {**_change("eval.vs_init_nocfg.score", 0.30, 0.45, 0.10, 0.20),
                                "eval.init_cfg.score": 0.5, "eval.diversity.init": 0.2, "eval.diversity.policy": 0.19}),
        "distill": _run(experiment, {**_change("eval.student_vs_teacher.score", 0.5, 0.47, -0.07, 0.01),
                                     "eval.teacher_few_step.score": 0.2, "latency.ratio": 18.0}),
    }
    lines = post_training_summary(isolated_outputs, runs)
    assert lines == [
        "    SFT warm      : domain score 0.400 -> 0.500 (+0.100, 95% CI [+0.050, +0.150]); merged 0.400 -> 0.490 "
        "(+0.090, 95% CI [+0.040, +0.140]), 90% of the gain kept",
        "    PO synthetic  : preferred over its reference on 0.620 [0.550, 0.690] of held-out prompts; score "
        "0.500 -> 0.550 (+0.050, 95% CI [+0.010, +0.090])",
        "    reward model  : held-out pairwise accuracy 0.700 [0.590, 0.810] on 64 pairs",
        "    RL (no CFG)   : prompt-following without CFG 0.300 -> 0.450 (+0.150, 95% CI [+0.100, +0.200]); the start "
        "with CFG 0.500; diversity 0.200 -> 0.190",
        "    distilled     : teacher with CFG -> student without CFG 0.500 -> 0.470 (-0.030, 95% CI [-0.070, +0.010]) "
        "(teacher at the student's steps 0.200), 18.0x faster",
    ]


def test_a_missing_measurement_reads_n_a(isolated_outputs: Path) -> None:
    experiment = configure_tracking(isolated_outputs)
    lines = post_training_summary(isolated_outputs, {"merge": _run(experiment, {"score.base.cool": 0.3})})
    assert lines == ["    SFT cool      : domain score n/a; merged n/a, no gain to keep"]


def test_the_closing_summary_says_where_each_output_is_and_what_curation_kept(isolated_outputs: Path,
                                                                              tmp_path: Path) -> None:
    names = ("curated_1024", "curated_256", "midtrain", "pretrained", "final", "distilled", "expander")
    outputs = {name: tmp_path / name for name in names}
    for directory in outputs.values():
        directory.mkdir()
    (outputs["curated_1024"] / SUMMARY_FILE).write_text(json.dumps({"kept": 3, "total": 9}))
    (outputs["curated_256"] / SUMMARY_FILE).write_text(json.dumps({"kept": 7, "total": 9}))
    (outputs["midtrain"] / SUMMARY_FILE).write_text(json.dumps({"sampled": 4, "input": 7, "added_for_coverage": 1,
                                                                "concepts_in_input": 5, "concepts_lost": 0}))
    (outputs["distilled"] / DISTILL_FILE).write_text(json.dumps({"student_steps": 4}))
    lines = pipeline_summary(isolated_outputs, "parent", {}, outputs).splitlines()
    assert lines[:4] == ["krea2 pipeline finished", "  curated data :",  # in resolution order
                         f"    stage  256: kept 7 of 9: {outputs['curated_256']}",
                         f"    stage 1024: kept 3 of 9: {outputs['curated_1024']}"]
    assert "    sampled 4 of 7 (1 added for entity coverage; 5 concepts, 0 lost); plots: cluster_sizes.png, " \
           "tag_counts.png" in lines
    assert f"  distilled    : {outputs['distilled']} (4-step student without CFG: {DISTILL_FILE})" in lines
    assert lines[-2] == "  MLflow       : parent run parent; stage runs {}"
