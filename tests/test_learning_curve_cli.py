"""benchmarks/learning_curve.py: --runs upper and --init go together, said in one line before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "learning_curve.py"


@pytest.mark.parametrize("args", [["--runs", "upper"], ["--runs", "first_stage", "--init", "ckpt"]])
def test_upper_and_init_go_together(args: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--keep", str(tmp_path / "root")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--init goes with --runs upper" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "root").exists()
