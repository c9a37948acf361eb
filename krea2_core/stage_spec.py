"""One definition per stage, beside its ``run_*`` function, that everything else derives from.

A ``StageSpec`` names a stage, the kind of artifact it publishes, its inputs (and the stages that produce them),
its settings and the function that runs it. The settings are the stage's typed slice of the pipeline config:
exactly the fields that change its output. So the three places a stage's identity matters agree by construction:

- the artifact key (``execute_stage`` digests the stage name, its settings and its inputs' digests);
- the Flyte task, which takes the settings and the input artifacts and nothing else but the untracked execution
  inputs (``parent_run_id``; ``parallel``, Ray's CPU parallelism, which changes no output), so Flyte's cache key
  is the artifact key's;
- ``krea2 rerun`` and its dry run (krea2_core/rerun.py), which compare and recompute the same settings.

Every ``run`` is a module-level function ``run(inputs, settings, parent_run_id="", ...)`` with the input artifact
directories by name; one taking ``parallel=`` says so with ``parallel=True``. A ``distributed`` stage's ``run``
is called by every rank of a torchrun launch of ``settings.trainer.parallel`` and returns the artifact on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from krea2_core.config import PipelineConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str  # the kind of artifact it publishes
    inputs: Mapping[str, str]  # input name -> the stage that produces it; "a.b": entry b of a task's input a
    settings: Callable[[PipelineConfig], Any]  # its config slice (None for a stage no setting changes)
    run: Callable[..., Path | None]
    # inputs a run may go without: name -> whether a config has the stage take it (e.g. RL's reward model: when it
    # weighs the aesthetic reward and names no model for it)
    optional: Mapping[str, Callable[[PipelineConfig], bool]] = field(default_factory=dict)
    # files the config names that run reads, by keyword (e.g. a human annotation table; None: not given): a Flyte
    # task takes each as a FlyteFile or FlyteDirectory, and settings hold their digests
    files: Callable[[PipelineConfig], Mapping[str, Path | None]] | None = None
    parallel: bool = False  # run takes parallel= (the curation ParallelConfig)
    distributed: bool = False  # every torchrun rank calls run; settings.trainer.parallel is the launch shape


def run_stage(spec: StageSpec, config: PipelineConfig, inputs: Mapping[str, Path], parent_run_id: str = ""
              ) -> Path:
    """``spec``'s stage under ``config`` on ``inputs`` in this process (a distributed one on local ranks, as its
    Flyte Elastic task would run it), the way the CLI and ``krea2 rerun`` run a stage."""
    settings = spec.settings(config)
    if spec.distributed:  # positional: launch_local passes no keywords
        from krea2_core.training.launch import launch_local

        path = launch_local(settings.trainer.parallel, spec.run, dict(inputs), settings, parent_run_id)
    else:
        options = {**(spec.files(config) if spec.files else {}),
                   **({"parallel": config.curation.parallel} if spec.parallel else {})}
        path = spec.run(dict(inputs), settings, parent_run_id, **options)
    if path is None:
        raise RuntimeError(f"{spec.name}: rank 0 returned no artifact")
    return path
