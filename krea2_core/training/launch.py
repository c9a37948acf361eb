"""Start a training stage on this machine's processes the way torchrun (and Flyte Elastic) does, for the CLI
and tests; on a cluster the Flyte Elastic task or torchrun on each node does the launching."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

from krea2_core.training.config import TrainParallelConfig


def launch_local(parallel: TrainParallelConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on every one of ``parallel.nproc_per_node`` local ranks; returns rank 0's result.
    ``fn`` must be importable (a module-level function): workers are spawned, not forked."""
    if parallel.nnodes != 1:
        raise ValueError(f"launch_local starts one node; parallel.nnodes is {parallel.nnodes}: launch multi-node "
                         "runs with the Flyte Elastic task or torchrun on every node")
    if parallel.nproc_per_node == 1:
        return fn(*args)
    # imported here: the CLI imports this module for RankFailed and should not wait for torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # like torchrun: split the cores between the workers instead of letting each one use them all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel.nproc_per_node)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=parallel.nproc_per_node, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    # the launcher logs every failed process's traceback; RankFailed carries the one that matters instead
    launcher_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, fn)(*args)[0]
    except ChildFailedError as err:
        raise RankFailed.of(err) from None
    finally:
        launcher_log.setLevel(level)


class RankFailed(RuntimeError):
    """A rank of a launched stage failed. The message is that rank's own error (rank 0's when it failed), not the
    launcher's report of every process; ``rank_traceback`` keeps its traceback."""

    def __init__(self, message: str, rank_traceback: str = "") -> None:
        super().__init__(message)
        self.rank_traceback = rank_traceback

    @classmethod
    def of(cls, err: Any) -> RankFailed:
        """From torch elastic's ChildFailedError."""
        # a rank that raised left its error; the ranks the launcher then stopped left only a signal: the lowest rank
        # with an error (rank 0's when it raised) says why
        raised = [rank for rank, failure in err.failures.items() if isinstance(failure.message, dict)]
        rank = min(raised or err.failures)
        failure = err.failures[rank]
        info = failure.message if isinstance(failure.message, dict) else {"message": str(failure.message)}
        others = f" (and {len(err.failures) - 1} more rank(s))" if len(err.failures) > 1 else ""
        return cls(f"rank {rank} failed{others}: {info.get('message') or f'exit code {failure.exitcode}'}",
                   info.get("extraInfo", {}).get("py_callstack", ""))
