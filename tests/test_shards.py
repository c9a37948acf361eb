"""Resumable sharded work: a killed run resumes without redoing finished shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from krea2_core.curation.config import ParallelConfig
from krea2_core.shards import run_sharded

SERIAL = ParallelConfig(backend="serial")


def _square_worker(log: str, fail_at: int | None = None):
    def work(shard):
        if fail_at is not None and fail_at in shard:
            raise RuntimeError("boom")
        with open(log, "a") as f:
            f.write(f"{shard[0]}\n")
        return pd.DataFrame({"item": list(shard), "square": [x * x for x in shard]})
    return work


def test_results_keep_item_order_and_finished_shards_are_reused(tmp_path: Path) -> None:
    log = str(tmp_path / "calls.txt")
    items = list(range(23))
    with pytest.raises(RuntimeError, match="boom"):
        run_sharded(items, partial(_square_worker, log, 12), tmp_path / "work", 5, parallel=SERIAL)
    assert Path(log).read_text().split() == ["0", "5"]  # shards 0 and 1 finished before the failure

    frame, reused = run_sharded(items, partial(_square_worker, log), tmp_path / "work", 5, parallel=SERIAL)
    assert reused == 2
    assert Path(log).read_text().split() == ["0", "5", "10", "15", "20"]  # nothing redone
    assert frame["item"].tolist() == items and frame["square"].tolist() == [x * x for x in items]


def test_on_ray_actors(tmp_path: Path) -> None:
    import ray

    here = Path(__file__).resolve().parent  # workers import this module's worker function by name
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}})
    try:
        frame, reused = run_sharded(list(range(10)), partial(_square_worker, str(tmp_path / "log")), tmp_path / "w", 3,
                                    parallel=ParallelConfig(backend="ray", num_cpus=2))
    finally:
        ray.shutdown()
    assert reused == 0 and frame["square"].tolist() == [x * x for x in range(10)]


SCRIPT = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from pathlib import Path
    from krea2_core.curation.config import ParallelConfig
    from krea2_core.shards import run_sharded

    log, work = sys.argv[1], Path(sys.argv[2])

    def make():
        def work_on(shard):
            time.sleep(0.4)
            with open(log, "a") as f:
                f.write(f"{shard[0]}\\n")
            return pd.DataFrame({"item": list(shard)})
        return work_on

    frame, reused = run_sharded(list(range(40)), make, work, 4, parallel=ParallelConfig(backend="serial"))
    print("reused", reused, "rows", len(frame))
""")


def test_kill_9_loses_at_most_the_shard_in_flight(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    log, work = tmp_path / "calls.txt", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    job = subprocess.Popen([sys.executable, str(script), str(log), str(work)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    # a shard's call is logged just before its file is written: 4 logged calls mean (serially) 3 written shards
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 4):
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done_before = len(list(work.glob("shard-*.parquet")))
    # the kill can land while the in-flight shard's file is being written: its .tmp is left, never taken as done
    leftover = [p.name for p in work.glob("*.tmp")]
    assert 3 <= done_before < 10 and leftover in ([], [f"shard-{done_before:06d}.tmp"])

    result = subprocess.run([sys.executable, str(script), str(log), str(work)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"reused {done_before} rows 40" in result.stdout
    calls = [int(x) for x in log.read_text().split()]
    assert sorted(set(calls)) == list(range(0, 40, 4))  # every shard done once ...
    assert len(calls) - len(set(calls)) <= 1  # ... except at most the one killed in flight
    assert not list(work.glob("*.tmp"))  # the redone shard replaced its leftover
