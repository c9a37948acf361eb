from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from krea2_core.cli import main
from krea2_core.report import format_report, headline, stage_report
from krea2_core.tracking import configure_tracking, end_pipeline_run, start_pipeline_run


def _stage(experiment: str, parent: str, stage: str, start: int, seconds: float, metrics: dict[str, float],
           upstream: dict[str, str]) -> str:
    client = MlflowClient()
    run = client.create_run(experiment, start_time=start, run_name=stage,
                            tags={"krea2.kind": "stage", "krea2.stage": stage, "mlflow.parentRunId": parent,
                                  **{f"krea2.upstream.{k}": v for k, v in upstream.items()}})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, end_time=start + int(seconds * 1000))
    return run.info.run_id


def test_report_lists_each_stage_in_run_order_with_its_headline_metrics(isolated_outputs: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    experiment = configure_tracking(isolated_outputs)
    pipeline = start_pipeline_run(isolated_outputs, "tiny", {"seed": 0})
    t0 = 1_800_000_000_000
    pool = _stage(experiment, pipeline, "world_pool", t0, 6.4, {"count.files": 653, "count.group.real": 24}, {})
    pretrain = _stage(experiment, pipeline, "pretrain_256", t0 + 10_000, 120.0,
                      {"eval.score": 0.15, "loss": 0.2, "final.val_loss": 0.13, "eval.untrained.score": 0.1,
                       "eval.vs_untrained.score": 0.05, "eval.vs_untrained.score.low": 0.02,
                       "eval.vs_untrained.score.high": 0.08, "eval.vs_untrained.score.before": 0.1,
                       "eval.vs_untrained.score.after": 0.15, "eval.kind": 0.3, "eval.kind.low": 0.25,
                       "eval.kind.high": 0.35},
                      {"packed": pool})
    merge = _stage(experiment, pipeline, "merge", t0 + 200_000, 30.0,
                   {"eval.merged_uniform.warm.score": 0.18, "eval.base.warm.score": 0.14, "eval.base.warm.count": 0.2,
                    "vs_base.merged.warm.score": 0.04, "vs_base.merged.warm.score.low": -0.01,
                    "vs_base.merged.warm.score.high": 0.09, "vs_base.merged.warm.score.before": 0.14,
                    "vs_base.merged.warm.score.after": 0.18},
                   {"init": pretrain})
    end_pipeline_run(isolated_outputs, pipeline, [merge])

    rows = stage_report(pipeline)
    assert [(r.stage, r.seconds) for r in rows] == [("world_pool", 6.4), ("pretrain_256", 120.0), ("merge", 30.0)]
    assert list(rows[1].metrics) == ["eval.vs_untrained.score", "eval.kind", "final.val_loss"]  # no loss curve
    assert rows[2].metrics == {"vs_base.merged.warm.score": "0.140 -> 0.180 (+0.040, 95% CI [-0.010, +0.090])"}
    assert [r.stage for r in stage_report(pretrain)] == ["world_pool", "pretrain_256"]  # a stage run: its upstream

    table = format_report(rows)
    assert ("| pretrain_256 | 120 | eval.vs_untrained.score 0.100 -> 0.150 (+0.050, 95% CI [+0.020, +0.080]), "
            "eval.kind 0.300 [0.250, 0.350], final.val_loss 0.13 |") in table
    assert table.endswith("3 stages, 156 s in their runs (2.6 min)")
    assert main(["report"]) == 0  # the newest pipeline run
    assert capsys.readouterr().out.strip() == table


def test_headlines_fall_back_to_none_for_unknown_stages() -> None:
    assert headline("pretrain_512", {"eval.count": 0.2, "mfu": 0.4}) == {"eval.count": "0.2"}
    assert headline("some_new_stage", {"eval.score": 0.2}) == {}


def test_report_errors_are_clear(isolated_outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report"]) == 2
    assert "no pipeline run in this tracking store" in capsys.readouterr().err
    assert main(["report", "0123456789abcdef0123456789abcdef"]) == 2
    assert "krea2: error:" in capsys.readouterr().err
    pipeline = start_pipeline_run(isolated_outputs, "tiny", {})
    assert main(["report", pipeline]) == 2  # not finished: no stage is tagged yet
    assert "names no stage run" in capsys.readouterr().err
