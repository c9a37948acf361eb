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
    report = json.loads(capsys.readouterr().out)  # one curated artifact per resolution stage
    assert list(report) == ["256", "512", "1024"]
    assert report["256"]["summary"] == {"total": 4, "kept": 3, "dropped.broken_file": 1}

    assert main(["lineage", report["512"]["mlflow_run_id"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["selection_512", "scoring", "ingest"]
    assert report["512"]["curated"] in lines[0]


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["curate", str(tmp_path / "missing")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--config", "curation: {stages: {'256': {max_aspect: 0.5}}}"]) == 2
    assert "curation.stages.256: max_aspect must be >= 1" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--config", "overrides"]) == 2  # a mistyped file name
    assert "config file not found: overrides" in capsys.readouterr().err


def test_an_expander_that_is_not_there_offline_is_one_line(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["expand", "--model", "org/name", "a cat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("krea2: error: We couldn't connect to") and err.count("\n") == 1


def test_tracebacks_only_with_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        main(["--debug", "curate", str(tmp_path / "missing")])

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug\nwith a second line")

    monkeypatch.setattr("krea2_core.cli.load_config", broken)
    assert main(["curate", str(tmp_path)]) == 1  # not bad input: exit 1, still one line
    assert capsys.readouterr().err == ("krea2: error: RuntimeError: an internal bug "
                                       "(krea2 --debug shows the traceback)\n")


def test_curate_reads_a_file_whose_name_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(Path(skimage.__file__).parent / "data" / "astronaut.png", folder / "astronaut.png")
    shutil.copy(Path(skimage.__file__).parent / "data" / "chelsea.png", bytes(folder) + b"/chels\xe9a.png")
    assert main(["curate", str(folder), "--config", "curation: {parallel: {backend: serial}}"]) == 0
    assert json.loads(capsys.readouterr().out)["256"]["summary"] == {"total": 2, "kept": 2}


def test_verify_finds_damage_and_repair_lets_the_stage_recompute(tmp_path: Path, isolated_outputs: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from diskcache import Cache

    from krea2_core.owners import HOST

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(Path(skimage.__file__).parent / "data" / "astronaut.png", folder / "astronaut.png")
    serial = "curation: {parallel: {backend: serial}}"
    assert main(["curate", str(folder), "--config", serial]) == 0
    curated = Path(json.loads(capsys.readouterr().out)["256"]["curated"])
    assert main(["verify"]) == 0
    assert capsys.readouterr().out.splitlines() == ["5 entries: 5 sound"]  # raw pool, scores, 3 stages' curated

    kept = curated / "kept.parquet"
    kept.write_bytes(kept.read_bytes()[:-1] + b"!")
    stale = curated.parent / f".{curated.name}.{HOST}-999999999.0123abcd.tmp"
    stale.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the Flyte local cache: one output names the damaged artifact
    with Cache(str(tmp_path / "home" / ".flyte" / "local-cache")) as cache:
        cache.set("select_images-1-abc", b"\n\x0fo0" + str(curated).encode())
        cache.set("score_images-1-def", b"\n\x0fo0" + str(curated.parent / "other").encode())
    assert main(["verify", str(isolated_outputs)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"stale staging  {stale}  written by {HOST}-999999999")
    assert lines[1].startswith(f"damaged        {curated}  {kept.relative_to(curated)} changed since it was published")
    assert lines[-1] == "6 entries: 4 sound, 1 damaged, 1 stale staging"
    # a damaged output is computed again, not served; the dead process's staging beside it is swept
    assert main(["curate", str(folder), "--config", serial]) == 0
    assert "krea2: recomputing" in capsys.readouterr().err and not stale.exists()
    assert main(["verify"]) == 0
    kept.write_bytes(b"x" + kept.read_bytes()[1:])
    monkeypatch.setenv("KREA2_VERIFY_MAX_BYTES", "0")  # every artifact "large": checked by size, re-hashed by --full
    assert main(["verify"]) == 0 and main(["verify", "--full"]) == 1
    capsys.readouterr()
    monkeypatch.delenv("KREA2_VERIFY_MAX_BYTES")

    assert main(["verify", "--repair"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"removed        {curated}" in lines and not curated.exists()
    assert lines[-1].endswith("removed 1: their stages compute them again on the next run")
    with Cache(str(tmp_path / "home" / ".flyte" / "local-cache")) as cache:
        assert list(cache.iterkeys()) == ["score_images-1-def"]
    assert main(["verify"]) == 0
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "is not an output root: it has no artifacts/ directory" in capsys.readouterr().err


def test_verify_lists_rows_whose_source_was_unreachable_and_repair_retries_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    import pandas as pd

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    image = Path(skimage.__file__).parent / "data" / "astronaut.png"
    table = tmp_path / "uris.parquet"
    pd.DataFrame({"uri": [str(image), f"http://127.0.0.1:{closed}/a.png"]}).to_parquet(table)
    serial = "curation: {parallel: {backend: serial}}"
    assert main(["curate", str(table), "--config", serial]) == 0
    assert json.loads(capsys.readouterr().out)["256"]["summary"] == {"total": 2, "kept": 1, "dropped.unreachable": 1}
    assert main(["verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (retryable,) = [line for line in lines if line.startswith("retryable")]
    assert "/artifacts/scores/" in retryable and retryable.endswith("1 row(s) unreachable")
    assert main(["verify", "--repair"]) == 0
    scores = Path(retryable.split()[1])
    assert not scores.exists() and f"removed        {scores}" in capsys.readouterr().out
    assert main(["curate", str(table), "--config", serial]) == 0  # scoring tries the source again
    assert scores.is_dir()
