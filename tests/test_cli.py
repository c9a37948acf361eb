import json
import shutil
from pathlib import Path

import pytest
import skimage

from krea2_core.cli import main


def test_curate_then_trace_lineage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.png", "chelsea.png", "text.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["curate", str(folder), "--config", "curation: {parallel: {backend: serial}}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["256"] == {"total": 4, "kept": 3, "dropped.broken_file": 1}

    assert main(["lineage", report["mlflow_run_id"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["selection", "scoring", "ingest"]
    assert report["curated"] in lines[0]


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["curate", str(tmp_path / "missing")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--config", "curation: {stages: {'256': {max_aspect: 0.5}}}"]) == 2
    assert "curation.stages.256: max_aspect must be >= 1" in capsys.readouterr().err


def test_curate_reads_a_file_whose_name_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(Path(skimage.__file__).parent / "data" / "astronaut.png", folder / "astronaut.png")
    shutil.copy(Path(skimage.__file__).parent / "data" / "chelsea.png", bytes(folder) + b"/chels\xe9a.png")
    assert main(["curate", str(folder), "--config", "curation: {parallel: {backend: serial}}"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["256"] == {"total": 2, "kept": 2}
