"""Lineage through the MLflow UI, clicked end to end: from the registered distilled model's version page a user
clicks to the run that made it, then down each run's Description links ("<stage> run") to the raw pool's run and
the world pool, seeing on every page the upstream run tag and the digest of every input dataset, and on a model
stage's page the registered version and the LoggedModel of its input.

Drives Debian's headless chromium (through Playwright) against a real ``mlflow server`` on the test's sqlite store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
SERVER_START_TIMEOUT_S = 45.0

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (pip install -e .[dev])")
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


CHAIN = (  # (stage, artifact kind, input name of the stage before): a model chain from the pool to the distilled model
    ("world_pool", "world_pool", ""), ("ingest", "raw_pool", "world_pool"), ("pretrain_256", "checkpoint", "curated"),
    ("rl", "checkpoint", "init"), ("distill", "checkpoint", "teacher"))


def test_lineage_clickable_from_the_distilled_model_to_the_raw_pool(isolated_outputs: Path, tmp_path: Path,
                                                                     mlflow_server: str) -> None:
    parent = start_pipeline_run(isolated_outputs, "tiny", {"seed": 3})
    manifests, previous = {}, None
    for stage, kind, input_name in CHAIN:
        path, manifests[stage] = execute_stage(stage, kind, _writer(stage), config={"stage": stage},
                                               inputs={input_name: previous} if previous else None,
                                               parent_run_id=parent)
        previous = path
    end_pipeline_run(isolated_outputs, parent, [manifests["distill"].mlflow_run_id])
    experiment_id = mlflow.get_experiment_by_name("krea2").experiment_id
    client = MlflowClient()
    models = {stage: client.get_run(m.mlflow_run_id).data.tags.get("krea2.model_id") for stage, m in manifests.items()}
    assert [stage for stage, model in models.items() if model] == ["pretrain_256", "rl", "distill"]
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    shots = tmp_path / "lineage_ui"
    shots.mkdir()
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        expect = playwright.expect
        page.goto(f"{mlflow_server}/#/models/krea2-distilled/versions/1?workflowType=machine_learning")
        expect(page.get_by_text("Source Run")).to_be_visible(timeout=30_000)
        page.screenshot(path=shots / "0-krea2-distilled-v1.png")
        page.click(f"a[href*='/runs/{manifests['distill'].mlflow_run_id}']")

        walked = []
        for depth, (stage, _, input_name) in enumerate(reversed(CHAIN)):
            run_id = manifests[stage].mlflow_run_id
            expect(page).to_have_url(re.compile(f"/runs/{run_id}"), timeout=30_000)
            # the run rendered (its id in About this run) down to its Description
            expect(page.locator("body")).to_contain_text(run_id, timeout=30_000)
            expect(page.locator("body")).to_contain_text("Inputs:" if input_name else "No inputs", timeout=30_000)
            text = " ".join(page.inner_text("body").split())
            assert f"krea2.stage : {stage}" in text, text[:3000]
            expect(page.locator(f"a[href*='/runs/{parent}']").first).to_be_visible()  # its pipeline run
            page.screenshot(path=shots / f"{depth + 1}-{stage}.png")
            walked.append(stage)
            if not input_name:
                assert "No inputs: a source stage." in text
                break
            upstream_stage = CHAIN[[s for s, _, _ in CHAIN].index(stage) - 1][0]
            upstream = manifests[upstream_stage]
            assert _datasets(text) == {input_name: upstream.digest[:36]}, text[:3000]
            assert _upstream_tags(text) == {input_name: upstream.mlflow_run_id}, text[:3000]
            if models[upstream_stage]:  # the model it read, linked and logged as its model input
                expect(page.locator(f"a[href*='/models/{models[upstream_stage]}']").first).to_be_visible()
            if stage == "distill":
                expect(page.locator("a", has_text="krea2-distilled")).to_be_visible()
            link = page.locator("a", has_text=f"{upstream_stage} run")
            assert link.get_attribute("target") == "_blank", link.evaluate("a => a.outerHTML")  # MLflow's Markdown
            with page.context.expect_page() as opened:
                link.click()
            page = opened.value  # the new tab; the one before stays open, as in a user's browser
        browser.close()
    assert walked == [stage for stage, _, _ in reversed(CHAIN)]

    for shot in sorted(shots.glob("*.png")):
        _assert_screenshot(shot)
        client.log_artifact(manifests["distill"].mlflow_run_id, str(shot), "lineage_ui")
    logged = {Path(a.path).name for a in client.list_artifacts(manifests["distill"].mlflow_run_id, "lineage_ui")}
    assert logged == {shot.name for shot in shots.glob("*.png")}
