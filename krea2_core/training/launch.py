"""Start a training stage on this machine's processes the way torchrun (and Flyte Elastic) does, for the CLI
and tests; on a cluster the Flyte Elastic task or torchrun on each node does the launching."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from krea2_core.config import TrainParallelConfig


def launch_local(parallel: TrainParallelConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on every one of ``parallel.nproc_per_node`` local ranks; returns rank 0's result.
    ``fn`` must be importable (a module-level function): workers are spawned, not forked."""
    if parallel.nnodes != 1:
        raise ValueError(f"launch_local starts one node; parallel.nnodes is {parallel.nnodes}: launch multi-node "
                         "runs with the Flyte Elastic task or torchrun on every node")
    if parallel.nproc_per_node == 1:
        return fn(*args)
    # like torchrun: split the cores between the workers instead of letting each one use them all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel.nproc_per_node)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=parallel.nproc_per_node, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    return elastic_launch(config, fn)(*args)[0]
