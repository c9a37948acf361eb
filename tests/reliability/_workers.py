"""Functions the reliability tests run in spawned processes (importable by module name)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def sleep_in_rank(folder: str) -> None:
    """A torchrun rank that records its pid and waits to be killed."""
    (Path(folder) / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(600)
