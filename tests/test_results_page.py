"""benchmarks/results_page.py: the docs' generated tables are the benchmarks' own recorded output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "results_page.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_docs_hold_what_the_results_files_recorded() -> None:
    done = _run("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_edited_table_is_found_and_regenerated(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("Intro.\n\n<!-- results: dedup_search.json -->\nstale numbers\n<!-- /results -->\n\nOutro.\n")
    done = _run("--check", str(doc))
    assert done.returncode == 1 and "-stale numbers" in done.stdout and "out of date" in done.stderr
    assert _run(str(doc)).returncode == 0
    text = doc.read_text()
    recorded = json.loads((SCRIPT.parent / "results" / "dedup_search.json").read_text())
    assert text.startswith("Intro.\n\n<!-- results: dedup_search.json -->\n`python benchmarks/dedup_search.py")
    assert recorded["tables"][0] in text and text.endswith("<!-- /results -->\n\nOutro.\n")
    assert _run("--check", str(doc)).returncode == 0


def test_a_region_without_its_results_file_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: no_such_benchmark.json -->\n<!-- /results -->\n")
    done = _run("--check", str(doc))
    assert done.returncode == 1 and "no_such_benchmark.json does not exist" in done.stderr
    assert doc.read_text() == "<!-- results: no_such_benchmark.json -->\n<!-- /results -->\n"  # untouched
