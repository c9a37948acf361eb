"""One checkpoint-producing stage run by every rank of a torchrun launch (pretraining, midtraining, SFT,
preference optimisation, RL, distillation).

Rank 0 runs the stage inside ``execute_stage`` (MLflow run, published artifact); the other ranks work in the same
scratch directory (the stage's key gives every rank the same one, so they share its checkpoints) and return None.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from krea2_core.artifacts import existing_artifact, read_manifest
from krea2_core.stages import StageOutput, execute_stage, output_root, stage_location
from krea2_core.tracking import StageRun
from krea2_core.training.config import TrainParallelConfig
from krea2_core.training.parallel import DistEnv, init_distributed

# (env, scratch directory, run, staging directory) -> the stage's output; run and staging are None off rank 0
StageWork = Callable[[DistEnv, Path, "StageRun | None", "Path | None"], "StageOutput | None"]


def run_distributed_stage(name: str, work: StageWork, *, parallel: TrainParallelConfig, view: Any,
                          inputs: dict[str, Path], check: Callable[[DistEnv], None] | None = None,
                          parent_run_id: str = "", root: Path | None = None) -> Path | None:
    """Every rank calls it. ``check(env)`` rejects bad input on every rank before anything is written; ``work``
    trains (every rank) and, on rank 0, returns the StageOutput it staged. Returns the ``checkpoint`` artifact on
    rank 0, None on the other ranks; the process group is torn down on the way out."""
    env = init_distributed(parallel.device)
    try:
        if env.world_size != parallel.world_size:
            raise RuntimeError(f"launched with {env.world_size} processes but parallel.nnodes x nproc_per_node is "
                               f"{parallel.world_size}: the launch and the config must agree")
        if check is not None:
            check(env)
        root = root or output_root()
        manifests = {key: read_manifest(path) for key, path in inputs.items()}
        out, scratch = stage_location(name, "checkpoint", config=view, manifests=manifests, root=root)
        # rank 0 looks for the finished artifact (removing a damaged one) and tells the others, so all train or none
        done = [existing_artifact(out) is not None if env.rank == 0 else None]
        if env.world_size > 1:
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            return out if env.rank == 0 else None
        if env.rank == 0:
            def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
                output = work(env, run.work_dir, run, staging)
                if output is None:
                    raise RuntimeError(f"{name}: rank 0's work returned no StageOutput")
                return output

            out, _ = execute_stage(name, "checkpoint", body, config=view, inputs=inputs,
                                   parent_run_id=parent_run_id, root=root)
            return out
        work(env, scratch, None, None)
        return None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
