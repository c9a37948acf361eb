"""Processes the project starts die with it, also when it is killed with SIGKILL and cannot clean up.

Ray's local node processes (raylet, GCS, its dashboard and runtime-env agents) outlive a killed driver: ``watch``
starts ``python -m krea2_core.reaper <owner pid> <pid>...``, a small process in its own session that waits for the
owner to go and then kills the listed processes. (Torchrun ranks need no reaper: torch's launcher children already
die with it; tests/reliability checks both.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil


def watch(pids: list[int]) -> subprocess.Popen[bytes] | None:
    """Kill ``pids`` (processes this one started) once this process is gone; None when there is nothing to watch."""
    if not pids:
        return None
    return subprocess.Popen([sys.executable, "-m", "krea2_core.reaper", str(os.getpid()), *map(str, pids)],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def started_here() -> list[int]:
    """Every live descendant of this process but reapers."""
    return [child.pid for child in psutil.Process().children(recursive=True)
            if "krea2_core.reaper" not in " ".join(_cmdline(child))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _reap(owner: int, pids: list[int]) -> None:
    watched = []
    for pid in pids:  # psutil.Process remembers each one's start time: a reused pid is never killed
        try:
            watched.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    try:
        psutil.Process(owner).wait()
    except psutil.NoSuchProcess:
        pass
    for process in watched:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(watched, timeout=10)


if __name__ == "__main__":
    _reap(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
