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

import functools
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
    # what a dry run computes without running the stage (krea2_core/rerun.py):
    # a selection's kept rows, preview(inputs, settings) -> DataFrame, from its input artifacts ...
    preview: Callable[[Mapping[str, Path], Any], Any] | None = None
    # ... and a per-image stage's (to compute, reused) counts, planned(inputs, settings, output root), whose image
    # input is a previewed DataFrame or a recorded artifact
    planned: Callable[[Mapping[str, Any], Any, Path], tuple[int, int]] | None = None

    def takes(self, name: str, config: PipelineConfig) -> bool:
        """Whether the stage takes its input ``name`` under ``config``."""
        return name not in self.optional or self.optional[name](config)


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


@functools.cache
def stage_specs(domains: tuple[str, ...] = ()) -> dict[str, StageSpec]:
    """Every stage's spec in pipeline order, which the Flyte graph, ``krea2 rerun`` and its dry run read; ``domains``
    are the configured SFT domains (a data and an SFT stage each). The specs live beside their ``run_*`` functions
    (imported here, not at the top: each of those modules imports this one); this is only their order."""
    from krea2_core.captioning.stages import SCENE_CAPTIONS, captioning_spec
    from krea2_core.curation.stages import EMBEDDING, SEMANTIC_SELECTION
    from krea2_core.data.packing import packing_spec
    from krea2_core.data.stages import INGEST, SCORING, WORLD_POOL, selection_spec
    from krea2_core.expander.data import EXPANDER_DATA
    from krea2_core.expander.rl import EXPANDER_RL
    from krea2_core.expander.sft import EXPANDER_SFT
    from krea2_core.post.annotations import ANNOTATIONS
    from krea2_core.post.distill import DISTILL
    from krea2_core.post.grpo import RL
    from krea2_core.post.merge import merge_spec
    from krea2_core.post.midtrain import MIDTRAIN, PACK_MIDTRAIN
    from krea2_core.post.pairs import PAIRS
    from krea2_core.post.preference import preference_spec
    from krea2_core.post.reward_model import REWARD_MODEL
    from krea2_core.post.sft import sft_data_spec, sft_spec
    from krea2_core.training.config import PRETRAIN_STAGES
    from krea2_core.training.pretrain import pretrain_spec

    specs = [WORLD_POOL, INGEST, SCORING, *map(selection_spec, PRETRAIN_STAGES), SCENE_CAPTIONS,
             *map(captioning_spec, PRETRAIN_STAGES), EMBEDDING, SEMANTIC_SELECTION,
             *(spec for stage in PRETRAIN_STAGES for spec in (packing_spec(stage), pretrain_spec(stage))),
             PACK_MIDTRAIN, MIDTRAIN, *map(sft_data_spec, domains), *map(sft_spec, domains), merge_spec(domains),
             PAIRS, preference_spec("synthetic"), ANNOTATIONS, preference_spec("calibration"), REWARD_MODEL, RL,
             DISTILL, EXPANDER_DATA, EXPANDER_SFT, EXPANDER_RL]
    return {spec.name: spec for spec in specs}
