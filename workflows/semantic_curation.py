"""Semantic curation (midtraining data selection) of one curated resolution stage:

    pyflyte run workflows/semantic_curation.py semantic_curation --curated <curated dir> --captions <captions dir> \
        [--preset tiny] [--config overrides.yaml]
"""

from __future__ import annotations

from flytekit import workflow
from flytekit.types.directory import FlyteDirectory

from krea2_core.config import SemanticCurationConfig, preset
from tasks.pipeline import resolve_config
from tasks.semantic import embed_on_device, semantic_select

_TINY = preset("tiny").semantic


@workflow
def semantic_curation(curated: FlyteDirectory, captions: FlyteDirectory, preset: str = "tiny", config: str = "",
                      parent_run_id: str = "") -> FlyteDirectory:
    """The midtraining selection, under a preset with YAML overrides (a file or inline)."""
    semantic = resolve_config(preset=preset, overrides=config).semantic
    return semantic_curation_stages(curated=curated, captions=captions, config=semantic, parent_run_id=parent_run_id)


@workflow
def semantic_curation_stages(curated: FlyteDirectory, captions: FlyteDirectory,
                             config: SemanticCurationConfig = _TINY, parent_run_id: str = "") -> FlyteDirectory:
    embeddings = embed_on_device(curated=curated, stage=config.stage, config=config.embedder,
                                 parent_run_id=parent_run_id)
    return semantic_select(curated=curated, embeddings=embeddings, captions=captions, config=config,
                           parent_run_id=parent_run_id)
