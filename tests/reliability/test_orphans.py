"""A run killed with SIGKILL leaves no processes behind: Ray's local node and torchrun ranks go with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _all_gone(processes: list[psutil.Process], within: float) -> list[str]:
    """The names of ``processes`` still alive after ``within`` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=within)
    return sorted(p.name() for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)


def _driver(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def test_a_killed_driver_takes_its_local_ray_along() -> None:
    driver = _driver("from krea2_core.curation.config import ParallelConfig; "
                     "from krea2_core.ray_map import ensure_ray; "
                     "ensure_ray(ParallelConfig(num_cpus=1)); print('up', flush=True); import time; time.sleep(600)")
    try:
        assert driver.stdout.readline().strip() == "up"
        ray = [p for p in psutil.Process(driver.pid).children(recursive=True) if "krea2_core.reaper" not in p.cmdline()]
        assert {"raylet", "gcs_server"} <= {p.name() for p in ray}
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert _all_gone(ray, within=20) == []


def test_a_killed_launcher_takes_its_ranks_along(tmp_path: Path) -> None:
    driver = _driver("import sys; from krea2_core.training.config import TrainParallelConfig; "
                     "from krea2_core.training.launch import launch_local; "
                     "from tests.reliability._workers import sleep_in_rank; "
                     f"launch_local(TrainParallelConfig(nproc_per_node=2), sleep_in_rank, {str(tmp_path)!r})")
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = [psutil.Process(int(p.read_text())) for p in tmp_path.glob("rank*.pid")]
        assert len(ranks) == 2
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert _all_gone(ranks, within=10) == []
