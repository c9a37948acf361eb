"""MLflow lineage: one parent run per pipeline execution, one child run per stage."""

from krea2_core.tracking.runs import (
    PARENT_KINDS,
    MetricsLog,
    StageRun,
    configure_tracking,
    describe_tracking_error,
    end_pipeline_run,
    lineage,
    output_location,
    run_metrics,
    start_pipeline_run,
    stage_run,
)

__all__ = ["PARENT_KINDS", "MetricsLog", "StageRun", "configure_tracking", "describe_tracking_error", "end_pipeline_run", "lineage", "output_location", "run_metrics", "start_pipeline_run", "stage_run"]
