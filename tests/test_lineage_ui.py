"""Lineage through the MLflow UI: from the last stage's run page a user walks, run id by run id, down to the
raw pool, seeing every upstream run and the digest of every input dataset.

Drives Debian's headless chromium against a real ``mlflow server`` started on the test's sqlite store.
The MLflow 3 run page (``#/experiments/<id>/runs/<run id>``, Overview tab) renders the Datasets and Tags
sections expanded, so ``--dump-dom`` holds the full tag values and the dataset digests (the screenshot
clips long tag keys/values with an ellipsis; the DOM text is complete). Tag values are plain text, not
links, so "following" an upstream tag means opening the run page of the run id it shows, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import end_pipeline_run, start_pipeline_run
from tests._services import free_port, stop_group, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000", "--window-size=1400,900"]
SERVER_START_TIMEOUT_S = 45.0

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is missing (apt-get install chromium; .ci/setup does)")


def _writer(text: str):
    def body(inputs: dict[str, Path], staging: Path, run) -> StageOutput:
        (staging / "data.txt").write_text(text + "".join((p / "data.txt").read_text() for p in inputs.values()))
        return StageOutput(counts={"rows": len(text)})
    return body


@pytest.fixture
def mlflow_server(isolated_outputs: Path, tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server (UI included) on a free loopback port, over the test's store."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1",
         "--backend-store-uri", f"sqlite:///{isolated_outputs / 'mlflow.db'}",
         "--default-artifact-root", str(isolated_outputs / "mlruns"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, SERVER_START_TIMEOUT_S, tmp_path / "mlflow-server.log")
        yield url
    finally:
        stop_group(proc)
        log.close()


class _VisibleText(HTMLParser):
    """The text a user sees: DOM text nodes outside script/style/svg, whitespace-collapsed."""

    _HIDDEN = {"script", "style", "svg", "noscript"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)

    @classmethod
    def of(cls, html: str) -> str:
        parser = cls()
        parser.feed(html)
        return " ".join(" ".join(parser.parts).split())


def _open_run_page(base_url: str, experiment_id: str, run_id: str, shot: Path, profile: Path) -> tuple[str, str]:
    """Render a run page in headless chromium: save a screenshot, return (DOM html, visible text).

    Retries a couple of times only while the SPA has not rendered the run yet (a slow first fetch)."""
    url = f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}"
    html = text = ""
    for _ in range(3):
        done = subprocess.run(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=90)
        html, text = done.stdout, _VisibleText.of(done.stdout)
        if f"Run ID {run_id}" in text and shot.exists():
            break
    assert f"Run ID {run_id}" in text, f"{url} did not render the run; visible text: {text[:2000]}"
    return html, text


def _upstream_tags(text: str) -> dict[str, str]:
    return dict(re.findall(r"krea2\.upstream\.(\w+) : ([0-9a-f]{32})\b", text))


def _datasets(text: str) -> dict[str, str]:
    """{input name: digest} from the Datasets section ("<input>:<kind> (<digest>)")."""
    return {name: digest for name, _kind, digest in re.findall(r"\b(\w+):(\w+) \(([0-9a-f]{36})\)", text)}


def _assert_screenshot(png: Path) -> None:
    assert png.stat().st_size > 10_000, f"{png} is only {png.stat().st_size} bytes"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 200, f"{png} looks blank: {len(colours)} distinct colours"


def test_lineage_walkable_in_mlflow_ui(isolated_outputs: Path, tmp_path: Path, mlflow_server: str) -> None:
    parent = start_pipeline_run(isolated_outputs, "tiny", {"seed": 3})
    pool, pool_m = execute_stage("world_pool", "world_pool", _writer("pool"), config={"n": 4}, parent_run_id=parent)
    raw, raw_m = execute_stage("ingest", "raw_pool", _writer("raw"), config={"shard": 2},
                               inputs={"world_pool": pool}, parent_run_id=parent)
    _, sel_m = execute_stage("selection", "selection", _writer("sel"), config={"k": 1},
                             inputs={"raw_pool": raw}, parent_run_id=parent)
    end_pipeline_run(isolated_outputs, parent, [sel_m.mlflow_run_id])
    experiment_id = mlflow.get_experiment_by_name("krea2").experiment_id
    expected = {  # stage -> (run id, {input: (upstream run id, dataset digest)})
        "selection": (sel_m.mlflow_run_id, {"raw_pool": (raw_m.mlflow_run_id, raw_m.digest[:36])}),
        "ingest": (raw_m.mlflow_run_id, {"world_pool": (pool_m.mlflow_run_id, pool_m.digest[:36])}),
        "world_pool": (pool_m.mlflow_run_id, {}),
    }

    # Walk down from the final stage's page using only what each page shows.
    shots_dir = tmp_path / "lineage_ui"
    shots_dir.mkdir()
    profile = tmp_path / "chromium-profile"
    run_id, visited, shots = sel_m.mlflow_run_id, [], []
    while run_id:
        shot = shots_dir / f"{len(visited)}-{run_id}.png"
        html, text = _open_run_page(mlflow_server, experiment_id, run_id, shot, profile)
        stage = re.search(r"krea2\.stage : (\w+)", text)
        assert stage, f"no krea2.stage tag on the page of {run_id}: {text[:2000]}"
        stage = stage.group(1)
        expected_run, expected_inputs = expected[stage]
        assert run_id == expected_run
        # Every page points back to the pipeline execution it belongs to.
        assert f'href="#/experiments/{experiment_id}/runs/{parent}"' in html
        upstream, datasets = _upstream_tags(text), _datasets(text)
        assert upstream == {name: up for name, (up, _) in expected_inputs.items()}, text
        assert datasets == {name: digest for name, (_, digest) in expected_inputs.items()}, text
        output_digest = re.search(r"krea2\.output_digest : ([0-9a-f]{64})\b", text)
        assert output_digest, text
        if visited:  # the digest of the dataset the page above consumed is this run's output digest
            assert output_digest.group(1)[:36] == visited[-1][2]
        _assert_screenshot(shot)
        shots.append(shot)
        assert len(upstream) <= 1  # a chain: at most one input per stage here
        visited.append((stage, run_id, next(iter(datasets.values()), "")))
        run_id = next(iter(upstream.values()), "")  # what a user copies from the tag into the run URL
    assert [stage for stage, _, _ in visited] == ["selection", "ingest", "world_pool"]

    client = MlflowClient()
    for shot in shots:
        client.log_artifact(sel_m.mlflow_run_id, str(shot), "lineage_ui")
    logged = {Path(a.path).name for a in client.list_artifacts(sel_m.mlflow_run_id, "lineage_ui")}
    assert logged == {shot.name for shot in shots}
