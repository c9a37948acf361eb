"""``krea2 ui`` through Flask's test client on a recorded pipeline run: the pages, the dry run and a re-run of one
stage, and every bad request answered on the page (tests/test_ui_browser.py drives the same UI in chromium)."""

from __future__ import annotations

import html
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

from krea2_core.config import PipelineConfig, load_config
from krea2_core.rerun import stage_runs
from krea2_core.ui.app import create_app
from krea2_core.ui.jobs import Job
from krea2_core.ui.pages import stage_slice
from tests._recorded import record_curation


@pytest.fixture(scope="module")
def recorded_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, PipelineConfig, dict]]:
    """One recorded curation run for the module (it takes ~20 s): (output root, run id, config, artifacts)."""
    root = tmp_path_factory.mktemp("ui") / "krea2-outputs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KREA2_OUTPUT_ROOT", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root, *record_curation(root)


@pytest.fixture
def client(recorded_root: tuple[Path, str, PipelineConfig, dict], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(recorded_root[0]))  # over the per-test root of isolated_outputs
    return create_app(recorded_root[0]).test_client()


def _text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def _slice(run_id: str, stage: str) -> dict:
    return stage_slice(stage_runs(run_id), stage, load_config("tiny"))[1]


def test_pages_show_the_run_its_stages_and_a_stage_slice(recorded_root, client) -> None:
    _, run_id, config, _ = recorded_root
    index = _text(client.get("/"))
    assert f"/run/{run_id}" in index and "pipeline" in index
    run = _text(client.get(f"/run/{run_id}"))
    for stage in ("world_pool", "ingest", "scoring", "selection_256", "selection_1024"):
        assert f"/run/{run_id}/stage/{stage}" in run
    assert run.count(">computed<") == 6  # every stage computed in this run, none from cache
    assert "count.kept" in run

    page = client.get(f"/run/{run_id}/stage/selection_256")
    assert page.status_code == 200, _text(page)
    recorded = _slice(run_id, "selection_256")
    # the slice is the config the stage reads, as recorded: its filters and the shared dedup settings
    assert recorded == {"curation": {"stages": {"256": yaml.safe_load(yaml.safe_dump(
        config.to_dict()["curation"]["stages"]["256"]))}, "dedup": config.to_dict()["curation"]["dedup"]}}


def test_dry_run_of_the_recorded_slice_is_all_cached_and_an_edit_reruns_its_stage(recorded_root, client) -> None:
    _, run_id, _, _ = recorded_root
    recorded = _slice(run_id, "selection_256")
    same = _text(client.post(f"/run/{run_id}/stage/selection_256",
                             data={"action": "dry_run", "config": yaml.safe_dump(recorded)}))
    assert "re-run</td>" not in same and same.count("cached: same config and inputs") == 6

    recorded["curation"]["stages"]["256"]["min_side"] = 200
    edited = _text(client.post(f"/run/{run_id}/stage/selection_256",
                               data={"action": "dry_run", "config": yaml.safe_dump(recorded)}))
    assert "config changed: filters.min_side" in edited and edited.count("cached: same config and inputs") == 5


@pytest.mark.parametrize(("text", "message"), [
    ("curation: [", "the YAML does not parse"),
    ("- 1\n- 2", "must be a YAML mapping"),
    ("curation:\n  bogus_key: 1", "bogus_key"),
    ("curation:\n  stages:\n    '256':\n      min_side: -5", "min_side"),
])
def test_bad_config_is_one_message_on_the_page(recorded_root, client, text: str, message: str) -> None:
    _, run_id, _, _ = recorded_root
    for action in ("dry_run", "rerun"):
        response = client.post(f"/run/{run_id}/stage/selection_256", data={"action": action, "config": text})
        page = _text(response)
        assert response.status_code == 400 and message in page and "Traceback" not in page
        assert text.split("\n")[0] in page  # the user's text is kept in the editor
    assert not (recorded_root[0] / "ui-jobs").exists()  # nothing was started


def test_unknown_run_or_stage_is_a_message_not_a_traceback(recorded_root, client) -> None:
    _, run_id, _, _ = recorded_root
    for url, message in ((f"/run/{'0' * 32}", "0" * 32), (f"/run/{run_id}/stage/embedding", "'embedding' is not in"),
                         ("/job/nope", "no re-run nope"), (f"/artifact/{run_id}/../../etc/passwd", "")):
        response = client.get(url)
        page = _text(response)
        assert response.status_code in (400, 404) and message in page and "Traceback" not in page


def _wait(client, job_url: str, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = _text(client.get(job_url))
        if 'id="status" class="status-running"' not in page:
            return page
        time.sleep(1)
    pytest.fail(f"the re-run did not end in {timeout_s:.0f} s:\n{page}")


def test_rerun_runs_the_stage_in_the_background_once_at_a_time(recorded_root, client) -> None:
    root, run_id, _, _ = recorded_root
    recorded = _slice(run_id, "selection_512")
    recorded["curation"]["stages"]["512"]["min_side"] = 200
    form = {"action": "rerun", "config": yaml.safe_dump(recorded)}
    started = client.post(f"/run/{run_id}/stage/selection_512", data=form)
    assert started.status_code == 302
    busy = client.post(f"/run/{run_id}/stage/selection_512", data=form)  # the child is still importing
    assert busy.status_code == 400 and "selection_512 is already re-running" in _text(busy)

    page = _wait(client, started.location)
    assert 'class="status-finished"' in page, page
    new_run = MlflowClient().get_run(re.search(r'href="/run/(\w+)" id="new-run"', page).group(1))
    assert new_run.data.tags["krea2.kind"] == "rerun" and new_run.data.tags["krea2.rerun_of"] == run_id
    stage_run = MlflowClient().get_run(new_run.data.tags["krea2.stage_run.selection_512"])
    original = MlflowClient().get_run(MlflowClient().get_run(run_id).data.tags["krea2.stage_run.selection_512"])
    assert stage_run.data.params["filters.min_side"] == "200"
    assert stage_run.data.metrics["count.kept"] < original.data.metrics["count.kept"]
    index = _text(client.get("/"))
    assert "re-run of selection_512" in index and f"/run/{new_run.info.run_id}" in index
    rerun_page = _text(client.get(f"/run/{new_run.info.run_id}"))
    assert ">computed<" in rerun_page and ">cache hit<" in rerun_page  # the stage ran; its inputs were reused


def test_rerun_of_a_stage_whose_input_is_gone_is_refused(recorded_root, client, tmp_path: Path) -> None:
    _, run_id, _, paths = recorded_root
    backup = tmp_path / "scores"
    shutil.move(paths["scores"], backup)
    try:
        response = client.post(f"/run/{run_id}/stage/selection_1024",
                               data={"action": "rerun", "config": yaml.safe_dump(_slice(run_id, "selection_1024"))})
        assert response.status_code == 400 and "(scoring) is gone" in _text(response)
    finally:
        shutil.move(backup, paths["scores"])


def test_a_job_log_shows_each_progress_bar_at_its_latest_state(tmp_path: Path) -> None:
    job = Job("j", "selection_256", "run", tmp_path, process=None)
    job.log_path.write_text("start\nscore:  10%\rscore:  50%\rscore: 100%\ndone\r\n")
    assert job.log_tail() == "start\nscore: 100%\ndone"
    assert job.log_tail(lines=1) == "done"
