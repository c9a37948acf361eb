"""``krea2 ui`` in a real headless chromium (Debian's, driven by Playwright), as a user would use it: open a
recorded pipeline run, change a selection threshold, dry-run, re-run, and find the new run listed with its
changed counts; a bad YAML shows its error. Screenshots of each page go to $KREA2_SCREENSHOTS (default: the
test's temp dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from tests._recorded import record_curation
from tests._services import free_port, stop_group, wait_http

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (pip install -e .[dev])")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is missing (apt-get install chromium; .ci/setup does)")


@pytest.fixture
def ui(isolated_outputs: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(the UI's URL, a recorded pipeline run id): `krea2 ui` started on a free loopback port, stopped by PID."""
    run_id, _, _ = record_curation(isolated_outputs)
    port = free_port()
    log_path = tmp_path / "ui.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "krea2_core.cli", "ui", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, proc, 60, log_path)
        yield url, run_id
    finally:
        stop_group(proc)


@pytest.fixture
def page(tmp_path: Path):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def test_a_user_reruns_a_selection_with_a_new_threshold(ui: tuple[str, str], page, tmp_path: Path) -> None:
    url, run_id = ui
    shots = Path(os.environ.get("KREA2_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    expect = playwright.expect

    page.goto(url)
    page.screenshot(path=shots / "1-runs.png", full_page=True)
    page.click(f"a[href='/run/{run_id}']")
    expect(page.locator("#stages")).to_contain_text("selection_256")
    expect(page.locator("#stages")).to_contain_text("count.kept")
    page.screenshot(path=shots / "2-run.png", full_page=True)

    page.click(f"a[href='/run/{run_id}/stage/selection_256']")
    recorded = page.input_value("#config")
    assert "min_side: 32" in recorded
    page.fill("#config", "curation: [")  # bad YAML: a message on the page, the text kept
    page.click("#dry-run")
    expect(page.locator("#error")).to_contain_text("the YAML does not parse")
    assert page.input_value("#config") == "curation: ["
    page.screenshot(path=shots / "3-bad-yaml.png", full_page=True)

    page.fill("#config", recorded.replace("min_side: 32", "min_side: 200"))
    page.click("#dry-run")
    plan = page.locator("#plan")
    expect(plan).to_contain_text("config changed: filters.min_side")
    expect(plan.locator("tr", has_text="selection_256")).to_contain_text("re-run")
    expect(plan.locator("tr", has_text="selection_512")).to_contain_text("cached")
    page.screenshot(path=shots / "4-dry-run.png", full_page=True)

    page.click("#rerun")
    expect(page.locator("#status")).to_have_text("finished", timeout=180_000)  # the page reloads while it runs
    expect(page.locator("#log")).to_contain_text('"stage": "selection_256"')
    page.screenshot(path=shots / "5-rerun-finished.png", full_page=True)

    page.click("#new-run")
    expect(page.locator("#stages tr", has_text="selection_256")).to_contain_text("computed")
    expect(page.locator("#stages tr", has_text="scoring")).to_contain_text("cache hit")
    page.click("nav a")
    runs = page.locator("#runs")
    listed = runs.locator("tr", has_text="re-run of selection_256")
    expect(listed).to_have_count(1)
    page.screenshot(path=shots / "6-runs-after.png", full_page=True)

    client = MlflowClient()
    original = client.get_run(client.get_run(run_id).data.tags["krea2.stage_run.selection_256"])
    kept_before = int(original.data.metrics["count.kept"])
    kept_after = int(listed.locator("td").last.inner_text().split("count.kept ")[1].split()[0])
    assert kept_after < kept_before  # the stricter threshold, listed with the run
    for shot in shots.glob("*.png"):
        assert shot.stat().st_size > 5_000, shot  # a rendered page, not a blank one
