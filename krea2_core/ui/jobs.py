"""Re-runs started from the UI: ``krea2 rerun`` in a child process, its log on disk, one at a time per stage.

A child process rather than a thread: a stage may launch torchrun ranks or Ray, and a crash or a hang in it must
not take the UI down. The command is the CLI's own, so a UI re-run and a terminal one are the same code path.
Two re-runs of one stage at once are refused here (the artifact layer would keep either from corrupting the
other's output, but the second would only repeat the first's work).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

@dataclass
class Job:
    id: str
    stage: str
    from_run: str
    directory: Path  # its overrides.yaml and log
    process: subprocess.Popen = field(repr=False)

    @property
    def log_path(self) -> Path:
        return self.directory / "log.txt"

    @property
    def status(self) -> str:
        code = self.process.poll()
        return "running" if code is None else "finished" if code == 0 else "failed"

    def log_tail(self, lines: int = 40) -> str:
        """The log's last lines, a progress bar's redraws collapsed to its latest state."""
        # bytes, not read_text: its universal newlines would turn each redraw's bare \r into a line
        text = self.log_path.read_bytes().decode(errors="replace") if self.log_path.exists() else ""
        # tqdm redraws its bar after a bare carriage return: a line shows what follows its last one
        shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\r\n").split("\n")]
        return "\n".join(shown[-lines:])

    def result(self) -> dict[str, Any] | None:
        """The CLI's JSON answer (output, stage and parent run ids, counts) once the job finished."""
        if self.status != "finished":
            return None
        text = self.log_path.read_text(errors="replace")
        start = text.rfind('{\n  "stage"')
        return json.loads(text[start:]) if start >= 0 else None


class StageBusy(RuntimeError):
    """A re-run of this stage is already running."""


class Jobs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def start(self, stage: str, from_run: str, preset: str, overrides: dict[str, Any]) -> Job:
        with self._lock:
            running = next((job for job in self._jobs.values() if job.stage == stage and job.status == "running"),
                           None)
            if running is not None:
                raise StageBusy(f"{stage} is already re-running (job {running.id}); wait for it to end")
            job_id = uuid.uuid4().hex[:12]
            directory = self.directory / job_id
            directory.mkdir(parents=True)
            (directory / "overrides.yaml").write_text(yaml.safe_dump(overrides, sort_keys=False))
            command = [sys.executable, "-m", "krea2_core.cli", "rerun", stage, "--from-run", from_run,
                       "--preset", preset, "--config", str(directory / "overrides.yaml")]
            with (directory / "log.txt").open("wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            job = Job(job_id, stage, from_run, directory, process)
            self._jobs[job_id] = job
            return job
