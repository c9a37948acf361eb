"""Map a function over shards of work on Ray (a local Ray by default, or the cluster the process is
attached to, e.g. by flytekitplugins-ray) or in-process, with a progress bar either way."""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from krea2_core import reaper
from krea2_core.curation.config import ParallelConfig

T = TypeVar("T")
R = TypeVar("R")


def ensure_ray(config: ParallelConfig) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance on loopback
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        reaper.watch(reaper.started_here())  # the local node's processes (none when attached to a cluster)


def _apply(fn: Callable[[Sequence[T]], list[R]], shard: Sequence[T]) -> list[R]:
    return fn(shard)


def map_shards(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], config: ParallelConfig,
               desc: str) -> list[R]:
    """``fn`` takes a shard (a slice of ``items``) and returns one result per item; results keep order.

    ``fn`` must be picklable (a module-level function or a functools.partial of one) for Ray.
    """
    shards = [items[start:start + config.shard_size] for start in range(0, len(items), config.shard_size)]
    results: list[list[R]] = []
    with tqdm(total=len(items), desc=desc, unit="img") as progress:
        if config.backend == "serial":
            for shard in shards:
                results.append(fn(shard))
                progress.update(len(shard))
        else:
            import ray

            ensure_ray(config)
            remote = ray.remote(num_cpus=1)(_apply)
            fn_ref = ray.put(fn)  # shipped once, not once per shard
            refs = [remote.remote(fn_ref, shard) for shard in shards]
            position = {ref: index for index, ref in enumerate(refs)}
            done: dict[int, list[R]] = {}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                index = position[ready[0]]
                done[index] = ray.get(ready[0])
                progress.update(len(shards[index]))
            results = [done[index] for index in range(len(shards))]
    return [item for shard in results for item in shard]
