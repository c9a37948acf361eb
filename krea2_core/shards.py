"""Resumable sharded work, e.g. model inference over millions of images.

Items are cut into fixed shards; each finished shard is written to ``work_dir`` atomically as Parquet.
A restarted run reads the finished shards back and processes only the rest, so a crash (even kill -9)
loses at most the shards in flight. Shards run in-process or on Ray actors, one model per actor, with a
GPU fraction per actor when asked (several small models share a GPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import pandas as pd
from tqdm.auto import tqdm

from krea2_core.curation.config import ParallelConfig

T = TypeVar("T")
Worker = Callable[[Sequence[T]], pd.DataFrame]  # one shard in, one row per item out


def _shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"shard-{index:06d}.parquet"


def save_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` through ``<path stem>.tmp`` and a rename: the file is complete or absent (one writer
    per path)."""
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class _Actor:
    """Holds one worker (e.g. a loaded model) for the life of the actor."""

    def __init__(self, make_worker: Callable[[], Worker]) -> None:
        self.worker = make_worker()

    def run(self, index: int, shard: Sequence[T]) -> tuple[int, pd.DataFrame]:
        return index, self.worker(shard)


def run_sharded(items: Sequence[T], make_worker: Callable[[], Worker], work_dir: Path, shard_size: int, *,
                parallel: ParallelConfig, num_gpus: float = 0.0, desc: str = "shards") -> tuple[pd.DataFrame, int]:
    """All shards' rows in item order, and how many shards were reused from an earlier attempt.

    ``make_worker`` must be picklable for Ray (a module-level function or a functools.partial of one).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    shards = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    pending = [k for k in range(len(shards)) if not _shard_path(work_dir, k).is_file()]
    reused = len(shards) - len(pending)
    with tqdm(total=len(shards), initial=reused, desc=desc, unit="shard") as progress:
        if parallel.backend == "serial" or not pending:
            worker = make_worker() if pending else None
            for k in pending:
                save_parquet(worker(shards[k]), _shard_path(work_dir, k))
                progress.update(1)
        else:
            import ray
            from ray.util import ActorPool

            from krea2_core.ray_map import ensure_ray

            ensure_ray(parallel)
            n_actors = min(len(pending), parallel.num_cpus)
            actor = ray.remote(num_cpus=1, num_gpus=num_gpus)(_Actor)
            pool = ActorPool([actor.remote(make_worker) for _ in range(n_actors)])
            for k, frame in pool.map_unordered(lambda a, k: a.run.remote(k, shards[k]), pending):
                save_parquet(frame, _shard_path(work_dir, k))
                progress.update(1)
    frames = [pd.read_parquet(_shard_path(work_dir, k)) for k in range(len(shards))]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), reused
