"""MLflow runs for pipeline executions and stages.

Tracking goes to ``MLFLOW_TRACKING_URI`` when set (a server or any store), else to a sqlite database
under the output root with artifacts beside it. A stage run records:
- params: the stage config, flattened to dotted keys;
- inputs: each input artifact as an MLflow dataset (its manifest digest, its location);
- tags: ``krea2.stage``, ``krea2.upstream.<input>`` = the run that produced that input (lineage),
  ``krea2.output_path`` = where its artifact lies, relative to the output root so a moved root still resolves;
- outputs: the output manifest (and the artifact files when small) plus metrics; a model artifact is also a
  LoggedModel (krea2_core/tracking/links.py, which also writes the run descriptions that link the lineage).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from filelock import FileLock
from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import Manifest, to_plain
from krea2_core.owners import is_gone, this_process
from krea2_core.tracking.links import EXPERIMENT_KIND, describe_inputs, describe_pipeline, publish_model

EXPERIMENT = "krea2"
_MAX_PARAM_LEN = 6000
_LOG_FILES_BELOW_BYTES = 50 << 20  # artifact dirs larger than this are referenced, not copied


_LOCAL_URI_ENV = "KREA2_LOCAL_TRACKING_URI"
OUTPUT_PATH_TAG = "krea2.output_path"
_LEGACY_OUTPUT_TAG = "krea2.output_uri"
OWNER_TAG = "krea2.owner"  # host-pid of the process running a stage run

# MLflow retries an unreachable tracking server for minutes by default (7 retries, doubling backoff, 120 s timeout):
# to a user that is a hang. These bound it to seconds; a variable set by the user wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

_UNREACHABLE = re.compile(r"Max retries exceeded|Failed to establish a new connection|timed out")
_CAUSE = re.compile(r"\[Errno -?\d+\][^'\")]*|Read timed out[^'\")]*")


def describe_tracking_error(error: Exception) -> str:
    """One line for a tracking failure: an unreachable server with its URI and cause, else the error's first line."""
    text = str(error)
    if _UNREACHABLE.search(text):
        cause = _CAUSE.search(text)
        return (f"MLflow tracking server {mlflow.get_tracking_uri()} unreachable "
                f"({cause.group(0).strip() if cause else 'no answer'}): start it, or unset MLFLOW_TRACKING_URI to "
                f"track under the output root (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT wait longer)")
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _user_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when a user set it ("" when unset or when it is the local store this module chose)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return "" if uri == os.environ.get(_LOCAL_URI_ENV) else uri


def configure_tracking(output_root: str | os.PathLike[str]) -> str:
    """Point MLflow at the tracking store and return the experiment id (created on first use). The first call of a
    process for a store marks the stage runs that killed processes left RUNNING as failed."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = Path(output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    user_uri = _user_tracking_uri()
    uri = user_uri or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI (to child processes too) ...
    if not user_uri:  # ... so remember it was ours: the next call with another output root must not inherit it
        os.environ[_LOCAL_URI_ENV] = uri
    if user_uri:
        experiment_id = _experiment(None)
    else:
        # MLflow creates and migrates a new sqlite store on first use: two processes doing it at once collide
        with FileLock(root / "mlflow.db.lock"):
            if not (root / "mlflow.db").exists():
                _create_store(root / "mlflow.db")
            experiment_id = _experiment(root)
    if uri not in _swept:
        _swept.add(uri)
        fail_interrupted_runs(experiment_id)
    return experiment_id


_swept: set[str] = set()  # tracking stores this process has looked for interrupted runs in


def _create_store(db: Path) -> None:
    """A new sqlite store, migrated in a scratch file and renamed into place: a process killed during MLflow's
    migrations (a second or two) leaves no half-built store behind. Call it holding the store's lock."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for leftover in db.parent.glob(f".{db.name}.*.init"):  # of killed processes: nobody else holds the lock
        leftover.unlink()
    scratch = db.with_name(f".{db.name}.{this_process()}.init")
    migrations = logging.getLogger("mlflow.store.db.utils")  # two INFO lines per new store otherwise
    level = migrations.level
    migrations.setLevel(logging.WARNING)
    try:
        SqlAlchemyStore(f"sqlite:///{scratch}", (db.parent / "mlruns").as_uri()).engine.dispose()
    finally:
        migrations.setLevel(level)
    os.replace(scratch, db)


def _experiment(root: Path | None) -> str:
    """The krea2 experiment's id, created on first use; in the local store of ``root``, which may have moved."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        if root is not None:
            _follow_moved_root(root, experiment.artifact_location)
        for key, value in EXPERIMENT_KIND.items():  # a store made before the kind was set
            if experiment.tags.get(key) != value:
                MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri() if root else None,
                                        tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def _follow_moved_root(root: Path, artifact_location: str) -> None:
    """A local store records absolute artifact locations (MLflow has no relative ones, nor an API to change them):
    when the output root was moved or copied, point them at the new place, so runs neither read nor write the old
    one."""
    here = (root / "mlruns").as_uri()
    if artifact_location == here:
        return
    with sqlite3.connect(root / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                   (here, artifact_location))
        db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                   (here, len(artifact_location) + 1, len(artifact_location), artifact_location))


def output_location(tags: dict[str, str], root: str | os.PathLike[str]) -> Path | None:
    """The artifact directory a stage run published, resolved against the current output root (None if it logged
    none); runs recorded before relative locations carry an absolute ``krea2.output_uri``."""
    if (relative := tags.get(OUTPUT_PATH_TAG)) is not None:
        return Path(root) / relative
    return Path(tags[_LEGACY_OUTPUT_TAG]) if _LEGACY_OUTPUT_TAG in tags else None


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclass/dict -> {"a.b.c": "value"} for MLflow params."""
    data = to_plain(config)
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LEN]
    return flat


def _log_params(params: dict[str, str]) -> None:
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[start:start + 100]))


PARENT_KINDS = ("pipeline", "rerun")  # runs whose krea2.stage_run.<stage> tags name the stage runs behind them


def start_pipeline_run(output_root: str | os.PathLike[str], preset: str, config: Any, *, rerun_of: str = "",
                       stage: str = "") -> str:
    """Create the parent run of one pipeline execution, or of a re-run of ``stage`` from the run ``rerun_of``;
    returns its run id."""
    experiment_id = configure_tracking(output_root)
    kind = "rerun" if rerun_of else "pipeline"
    extra = {"krea2.rerun_of": rerun_of, "krea2.rerun_stage": stage} if rerun_of else {}
    run = MlflowClient().create_run(
        experiment_id,
        run_name=f"krea2-{preset}-{f'rerun-{stage}-' if rerun_of else ''}{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"krea2.kind": kind, "krea2.preset": preset, **extra},
    )
    with mlflow.start_run(run_id=run.info.run_id):
        _log_params(flatten(config))
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def lineage(run_id: str) -> dict[str, str]:
    """{stage: run id} of a stage run and every run upstream of it, following ``krea2.upstream.*`` tags.

    A stage can be reached through two runs: a stage served from its artifact was made by an earlier run, from an input
    whose content a newer run of the upstream stage reproduced under another key. The newest of them is the one the
    latest execution ran."""
    client = MlflowClient()
    found: dict[str, Run] = {}
    seen: set[str] = set()
    pending = [run_id]
    while pending:
        if (current := pending.pop()) in seen:
            continue
        seen.add(current)
        run = client.get_run(current)
        stage = run.data.tags.get("krea2.stage", run.info.run_name)
        if stage not in found or run.info.start_time > found[stage].info.start_time:
            found[stage] = run
        pending += [v for k, v in run.data.tags.items() if k.startswith("krea2.upstream.")]
    return {stage: run.info.run_id for stage, run in found.items()}


def end_pipeline_run(output_root: str | os.PathLike[str], run_id: str, final_run_ids: list[str]) -> dict[str, str]:
    """Tag the parent run with the run behind every stage upstream of the final outputs (also stages that
    came from cache in this execution, whose runs belong to an earlier one); returns {stage: run id}."""
    configure_tracking(output_root)
    client = MlflowClient()
    stage_runs: dict[str, str] = {}
    for final in final_run_ids:
        stage_runs.update(lineage(final))
    for stage, stage_run_id in stage_runs.items():
        client.set_tag(run_id, f"krea2.stage_run.{stage}", stage_run_id)
    describe_pipeline(run_id, stage_runs)
    client.set_terminated(run_id, status="FINISHED")
    return stage_runs


def run_metrics(output_root: str | os.PathLike[str], run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    configure_tracking(output_root)
    return dict(MlflowClient().get_run(run_id).data.metrics)


@dataclass
class StageRun:
    run_id: str
    work_dir: Path  # scratch space that survives a failed attempt of the same stage and inputs
    output_root: Path
    stage: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image: Any, artifact_file: str) -> None:
        mlflow.log_image(image, artifact_file=artifact_file)

    def log_output(self, path: str | os.PathLike[str], manifest: Manifest) -> None:
        """Log an output artifact directory (copied when small, else only its manifest) and its digest."""
        path = Path(path)
        mlflow.set_tag("krea2.output_digest", manifest.digest)
        root = self.output_root.resolve()
        resolved = path.resolve()
        location = str(resolved.relative_to(root) if resolved.is_relative_to(root) else resolved)
        mlflow.set_tag(OUTPUT_PATH_TAG, location)
        publish_model(self.stage, self.run_id, manifest, location)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if size <= _LOG_FILES_BELOW_BYTES:
            mlflow.log_artifacts(str(path), artifact_path=manifest.kind)
        else:
            mlflow.log_text(manifest.to_json(), f"{manifest.kind}/manifest.json")



class MetricsLog:
    """A training stage's per-step metrics: ``metrics.jsonl`` gets every step, the MLflow run every ``every``
    steps and the ``last``. The first write after a resume cuts the file back to the steps before it, so a
    resumed curve has no repeats."""

    def __init__(self, path: Path, run: StageRun, *, every: int = 1, last: int | None = None) -> None:
        self.path, self.run, self.every, self.last = path, run, every, last
        self._cut = False

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self._cut:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            self.path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] < step))
            self._cut = True
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.every == 0 or step == self.last:
            self.run.log_metrics(metrics, step=step)


def fail_interrupted_runs(experiment_id: str) -> None:
    """Mark FAILED the stage runs still RUNNING whose process is gone (killed with -9, or its machine rebooted),
    tagged with why."""
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING' and "
                                                                "tags.`krea2.kind` = 'stage'")
    for run in running:
        owner = run.data.tags.get(OWNER_TAG, "")
        if is_gone(owner):
            client.set_tag(run.info.run_id, "krea2.failure", f"interrupted: its process {owner} is gone")
            client.set_terminated(run.info.run_id, status="FAILED")


def _local_source(path: Path) -> Any:
    # mlflow registers its local-artifact source class twice and warns on every resolve; name one
    local = [source for source in get_registered_sources() if source._get_source_type() == "local"][:1]
    return resolve_dataset_source(str(path.resolve()), candidate_sources=local)


@contextmanager
def stage_run(stage: str, *, output_root: str | os.PathLike[str], work_dir: Path, parent_run_id: str = "",
              config: Any = None, inputs: dict[str, tuple[str | os.PathLike[str], Manifest]] | None = None,
              ) -> Iterator[StageRun]:
    """A child run for one stage execution, with params, input datasets and upstream-run tags."""
    experiment_id = configure_tracking(output_root)
    inputs = inputs or {}
    tags = {"krea2.kind": "stage", "krea2.stage": stage, OWNER_TAG: this_process()}
    tags.update({f"krea2.upstream.{name}": m.mlflow_run_id for name, (_, m) in inputs.items() if m.mlflow_run_id})
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_run_id or None,
                          tags=tags) as run:
        if config is not None:
            _log_params(flatten(config))
        for name, (path, manifest) in inputs.items():
            dataset = MetaDataset(_local_source(Path(path)),
                                  name=f"{name}:{manifest.kind}", digest=manifest.digest[:36])
            mlflow.log_input(dataset, context=name)
        describe_inputs(experiment_id, inputs)
        yield StageRun(run.info.run_id, work_dir, Path(output_root), stage)
