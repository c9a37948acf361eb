"""Which process on which machine owns a staging directory or an MLflow run, and whether it is gone, so work that
a killed process left behind (a half-written artifact, a run stuck RUNNING) is cleaned up by the next one."""

from __future__ import annotations

import os
import re
import socket

import psutil

HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def this_process() -> str:
    """``<host>-<pid>`` of the calling process."""
    return f"{HOST}-{os.getpid()}"


def is_gone(owner: str) -> bool:
    """True when ``owner`` (from ``this_process``) names a process of this machine that no longer exists; a process
    of another machine, or an owner that is not one, is never declared gone."""
    host, _, pid = owner.rpartition("-")
    return host == HOST and pid.isdigit() and not psutil.pid_exists(int(pid))
