"""benchmarks/curation_scale.py: bad arguments are refused in one line before any work; a small run measures what
it should (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "curation_scale.py"


@pytest.mark.parametrize(("args", "message"), [
    (["--sizes", "0", "100"], "--sizes must be positive"),
    (["--sizes", "300", "100"], "--sizes must be strictly increasing"),
    (["--sizes", "100", "100"], "--sizes must be strictly increasing"),
    (["--imagededup-timeout", "-1"], "--imagededup-timeout must be >= 0"),
    (["--imagededup-threshold", "65"], "--imagededup-threshold must be in [0, 64]"),
])
def test_bad_arguments_are_refused_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--workdir", str(tmp_path / "work"),
                             "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()


def test_a_file_as_workdir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "file")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a directory" in result.stderr


@pytest.mark.slow
def test_small_run_times_every_phase_and_finds_the_planted_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(SCRIPT), "--sizes", "60", "120", "--workdir", str(tmp_path / "work"),
                    "--imagededup-timeout", "300", "--json", str(out)], check=True, timeout=900)
    report = json.loads(out.read_text())
    assert [r["images"] for r in report["results"]] == [60, 120]
    for result in report["results"]:
        assert all(result["phases"][p]["seconds"] > 0 for p in ("ingest", "scoring", "selection"))
        assert result["peak_rss_tree_mib"] > result["peak_rss_mib"] > 0
        assert result["ours"]["planted_pairs"] > 0 and result["ours"]["recall"] >= 0.8
        assert result["ours"]["precision"] >= 0.9
        assert result["ours"]["defects"] == 0 or result["ours"]["defects_rejected"] >= 0.5
        assert result["imagededup"]["finished"] and result["imagededup"]["recall"] >= 0.8
    assert set(report["linearity"]["per_image_ratio_largest_to_smallest"]) >= {"ingest", "scoring", "selection",
                                                                                "total"}
    assert report["generation"]["images"] == 120
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # no --keep-pool
