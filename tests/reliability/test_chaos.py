"""Chaos: `krea2 curate` killed with SIGKILL at three random points, then run to the end, publishes exactly what an
uninterrupted run does, and leaves a sound output root: no damaged artifact, no staging left, no run stuck RUNNING."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import read_manifest

SERIAL = "curation: {parallel: {backend: serial, shard_size: 4}}"


def _curate(folder: Path, root: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "KREA2_OUTPUT_ROOT": str(root), "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "krea2_core.cli", "curate", str(folder), "--config", SERIAL],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _artifacts(root: Path) -> dict[str, str]:
    """kind -> digest of every artifact under ``root`` (each verified on the way)."""
    return {path.parent.name: read_manifest(path).digest
            for path in sorted((root / "artifacts").glob("*/*")) if not path.name.startswith(".")}


def _killed_inside(run: subprocess.Popen[str], root: Path, kind: str, after: float) -> bool:
    """Kill ``run`` ``after`` seconds into its stage that makes ``kind`` (seen by its directory appearing); True when
    that left work unfinished (a staging directory, or a stage run still RUNNING)."""
    while run.poll() is None and not (root / "artifacts" / kind).exists():
        time.sleep(0.01)
    time.sleep(after)
    if run.poll() is not None:
        return False
    run.send_signal(signal.SIGKILL)
    run.wait()
    return "RUNNING" in _statuses(root) or bool(list((root / "artifacts").glob("*/.*.tmp")))


def _statuses(root: Path) -> set[str]:
    """The statuses of the stage runs in ``root``'s store, read without touching them (configure_tracking would mark
    the interrupted ones failed)."""
    if not (root / "mlflow.db").exists():
        return set()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("krea2")
    return {run.info.status for run in client.search_runs([experiment.experiment_id])} if experiment else set()


def test_a_run_killed_three_times_ends_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted((Path(skimage.__file__).parent / "data").glob("*.png")):
        for copy in range(3):  # a few seconds of work per stage
            shutil.copy(image, folder / f"{copy}_{image.name}")
    reference = _curate(folder, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

    root = tmp_path / "chaos"
    rng = random.Random(19)
    interrupted = [_killed_inside(_curate(folder, root), root, rng.choice(["raw_pool", "scores", "curated"]),
                                  after=rng.uniform(0.0, 0.5)) for _ in range(3)]
    assert any(interrupted)  # the kills landed inside stages, not only between them
    final = _curate(folder, root)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]

    assert _artifacts(root) == _artifacts(tmp_path / "reference") != {}
    assert not list((root / "artifacts").glob("*/.*.tmp"))
    assert _statuses(root) == {"FINISHED", "FAILED"}  # the killed stage runs were found and marked failed


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
