"""``krea2 ui``: a local web UI (Flask) to browse pipeline runs and re-run single stages.

Pages: the runs, newest first; a run's stages in execution order (status, wall time, headline metrics with their
CIs, pictures); a stage's recorded settings and its config slice as editable YAML, with a dry run (the plan of
``krea2 rerun --dry-run``) and a re-run (``krea2 rerun`` in a child process, krea2_core/ui/jobs.py) whose page
follows its log and links the new runs. Every request error is one sentence on the page, never a traceback.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from flask import Flask, abort, redirect, render_template, request, send_file, url_for
from mlflow.exceptions import MlflowException

from krea2_core.common.strict import ConfigError
from krea2_core.config import deep_merge, load_config
from krea2_core.rerun import RerunError, plan, resolve_inputs, stage_runs
from krea2_core.tracking import configure_tracking, describe_tracking_error
from krea2_core.tracking.links import run_link
from krea2_core.ui import pages
from krea2_core.ui.jobs import Jobs, StageBusy

_EXPECTED = (RerunError, ConfigError, StageBusy, yaml.YAMLError)


def _message(err: Exception) -> str:
    if isinstance(err, MlflowException):
        return describe_tracking_error(err)
    if isinstance(err, yaml.YAMLError):
        return "the YAML does not parse: " + " ".join(str(err).split())
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _parse_overrides(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text) if text.strip() else {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a YAML mapping of keys to values, got a {type(data).__name__}")
    return data


def create_app(output_root: Path, mlflow_url: str = "") -> Flask:
    """The UI over ``output_root``'s tracking store (or $MLFLOW_TRACKING_URI); ``mlflow_url`` (e.g.
    http://127.0.0.1:5000) adds links to the MLflow UI's run pages."""
    configure_tracking(output_root)
    app = Flask(__name__)
    app.jinja_env.filters["timestamp"] = lambda ms: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    jobs = Jobs(output_root / "ui-jobs")
    pictures = Path(tempfile.mkdtemp(prefix="krea2-ui-"))

    @app.context_processor
    def links() -> dict[str, Any]:
        def mlflow_link(experiment_id: str, run_id: str) -> str:
            return f"{mlflow_url.rstrip('/')}/{run_link(experiment_id, run_id)}" if mlflow_url else ""
        return {"mlflow_link": mlflow_link}

    @app.errorhandler(Exception)
    def failed(err: Exception) -> tuple[str, int]:
        if hasattr(err, "code") and hasattr(err, "description"):  # an HTTP error (404, 405): Flask's own words
            return render_template("error.html", message=f"{err.code}: {err.description}"), err.code
        expected = isinstance(err, (*_EXPECTED, MlflowException))
        app.logger.error("request failed", exc_info=not expected)
        return render_template("error.html", message=_message(err)), 400 if expected else 500

    @app.get("/")
    def index() -> str:
        return render_template("index.html", runs=pages.parent_runs())

    @app.get("/run/<run_id>")
    def run(run_id: str) -> str:
        parent = pages.parent_run(run_id)
        return render_template("run.html", run=parent, stages=pages.stage_rows(run_id))

    def stage_page(run_id: str, stage: str, *, text: str | None = None, steps: list | None = None,
                   error: str = "") -> tuple[str, int]:
        preset = pages.preset_of(run_id)
        settings, recorded = {}, {}
        try:
            settings, recorded = pages.stage_slice(stage_runs(run_id), stage, load_config(preset))
        except RerunError as err:
            error = error or _message(err)
        text = text if text is not None else yaml.safe_dump(recorded, sort_keys=False)
        return render_template("stage.html", run_id=run_id, stage=stage, preset=preset, text=text,
                               settings=yaml.safe_dump(settings, sort_keys=False), steps=steps,
                               error=error), 400 if error else 200

    @app.get("/run/<run_id>/stage/<stage>")
    def stage(run_id: str, stage: str) -> tuple[str, int]:
        return stage_page(run_id, stage)

    @app.post("/run/<run_id>/stage/<stage>")
    def act(run_id: str, stage: str) -> Any:
        text = request.form.get("config", "")
        action = request.form.get("action", "")
        if action not in ("dry_run", "rerun"):
            abort(400, f"unknown action {action!r}")
        try:
            preset, runs = pages.preset_of(run_id), stage_runs(run_id)
            overrides = deep_merge(pages.recorded_overrides(runs, load_config(preset)), _parse_overrides(text))
            config = load_config(preset, overrides)  # ConfigError names an unknown key or a bad value
            if action == "dry_run":
                return stage_page(run_id, stage, text=text, steps=plan(run_id, config))
            resolve_inputs(stage, runs, tuple(config.post.sft.domains))  # inputs still there?
            job = jobs.start(stage, run_id, preset, overrides)
        except (*_EXPECTED, MlflowException) as err:
            return stage_page(run_id, stage, text=text, error=_message(err))
        return redirect(url_for("job", job_id=job.id))

    @app.get("/job/<job_id>")
    def job(job_id: str) -> str:
        found = jobs.get(job_id)
        if found is None:
            abort(404, f"no re-run {job_id} in this UI session")
        return render_template("job.html", job=found, log=found.log_tail(), result=found.result())

    @app.get("/artifact/<run_id>/<path:artifact>")
    def artifact(run_id: str, artifact: str) -> Any:
        return send_file(pages.artifact_file(run_id, artifact, pictures / run_id), mimetype="image/png")

    return app


def serve(output_root: Path, host: str, port: int, mlflow_url: str = "") -> None:
    from werkzeug.serving import run_simple

    print(f"krea2 ui: http://{host}:{port} (runs of {output_root})", flush=True)
    run_simple(host, port, create_app(output_root, mlflow_url), threaded=True)
