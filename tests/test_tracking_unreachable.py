"""An unreachable tracking server fails a command in seconds with one line naming it (MLflow's own defaults retry
for minutes), and a user's own retry settings win over ours."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from krea2_core.cli import main
from krea2_core.tracking.runs import HTTP_DEFAULTS


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, then released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["curate", "report"])
def test_an_unreachable_server_is_one_line_in_seconds(command: str, isolated_outputs: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in HTTP_DEFAULTS.items():  # ours, whatever the environment running the tests says
        monkeypatch.setenv(name, value)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "images" / "a.png")
    began = time.monotonic()
    code = main(["curate", str(tmp_path / "images")] if command == "curate" else ["report"])
    assert code == 2 and time.monotonic() - began < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"MLflow tracking server {uri} unreachable" in err and "Connection refused" in err
    assert not (isolated_outputs / "artifacts").exists()  # nothing published


def test_the_users_retry_settings_win() -> None:
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}
    env.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
    out = subprocess.run([sys.executable, "-c", "import os, krea2_core.tracking; print(os.environ["
                          "'MLFLOW_HTTP_REQUEST_MAX_RETRIES'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"],
                         env=env, capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out == ["9", HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]]
