"""Midtraining data: a top-down mix. The domains and sources come first (``MidtrainConfig.domains``, in order,
each at its share of ``n_images``); each is filled from the semantic-curation sample (cluster-balanced,
deduplicated, coverage-checked) of the highest-resolution curated stage, then packed like a pretraining stage.

Artifact (kind ``packed``): the packed shards plus ``mix.parquet`` (id, uri, source, domain of every chosen
image) so a midtrained checkpoint traces back to the exact images and the domain each was chosen for.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.config import PipelineConfig
from krea2_core.data.config import PackingConfig
from krea2_core.post.config import MidtrainDomain
from krea2_core.training.config import TOP_STAGE
from krea2_core.data.packing import pack_stage, packing_config
from krea2_core.data.schemas import Captions, read_table
from krea2_core.data.stages import read_kept
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.pretrain import TrainingSettings, run_training_stage
from krea2_core.tracking import StageRun

MIX_FILE = "mix.parquet"
SAMPLE_FILE = "sample.parquet"  # the semantic selection's kept rows


@dataclass
class MidtrainPackingSettings:
    """What the midtraining shards depend on: the mix and how it is packed (not midtraining's recipe)."""

    domains: dict[str, MidtrainDomain]
    n_images: int
    packing: PackingConfig  # the top pretraining stage's buckets at midtraining's resolution and batch size


def select_mix(sample: pd.DataFrame, captions: pd.DataFrame, config: MidtrainPackingSettings, seed: int
               ) -> tuple[pd.DataFrame, dict[str, int]]:
    """(id, uri, source, domain) of the chosen images and, per domain, how many it lacked of its quota.

    Domains are filled in order, an image goes to the first domain that takes it, and each domain draws its
    quota from its matches by a seeded shuffle of the id-sorted sample (independent of row order).
    """
    missing = {"id", "uri", "source"} - set(sample.columns)
    if missing:
        raise ValueError(f"the semantic sample lacks columns {sorted(missing)}")
    pool = (sample[["id", "uri", "source"]].merge(captions[["id", "long"]], on="id", how="left", validate="one_to_one")
            .sort_values("id", ignore_index=True))
    pool["long"] = pool["long"].fillna("")
    rng = np.random.default_rng(seed)
    chosen: list[pd.DataFrame] = []
    taken = np.zeros(len(pool), dtype=bool)
    shortfall = {}
    for name, domain in config.domains.items():
        match = ~taken
        if domain.sources:
            match &= pool["source"].isin(domain.sources).to_numpy()
        if domain.keywords:
            words = r"\b(?:" + "|".join(re.escape(word) for word in domain.keywords) + r")\b"
            match &= pool["long"].str.contains(words, case=False, regex=True).to_numpy()
        quota = round(domain.share * config.n_images)
        rows = np.flatnonzero(match)
        rows = rows[rng.permutation(len(rows))[:quota]]
        taken[rows] = True
        chosen.append(pool.loc[rows, ["id", "uri", "source"]].assign(domain=name))
        shortfall[name] = quota - len(rows)
    return pd.concat(chosen, ignore_index=True), shortfall


def midtrain_packing_settings(config: PipelineConfig) -> MidtrainPackingSettings:
    pretrain, midtrain = config.pretrain, config.post.midtrain
    packing = dataclasses.replace(packing_config(pretrain, TOP_STAGE), resolution=midtrain.stage.resolution,
                                  global_batch=midtrain.stage.global_batch)
    return MidtrainPackingSettings(domains=midtrain.domains, n_images=midtrain.n_images, packing=packing)


def run_midtrain_packing(inputs: Mapping[str, Path], settings: MidtrainPackingSettings, parent_run_id: str = "", *,
                         root: Path | None = None) -> Path:
    """Choose the midtraining mix from the semantic ``selection`` and pack it (a ``packed`` artifact)."""
    read_manifest(inputs["curated"], kind="curated")
    read_manifest(inputs["captions"], kind="captions")
    read_manifest(inputs["selection"], kind="midtrain_selection")
    packing = settings.packing

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        texts = read_table(paths["captions"] / CAPTIONS_FILE, Captions)
        mix, shortfall = select_mix(pd.read_parquet(paths["selection"] / SAMPLE_FILE), texts, settings, packing.seed)
        kept = read_kept(paths["curated"])
        kept = kept[kept["id"].isin(mix["id"])]
        counts = pack_stage(kept, texts, resolution=packing.resolution, aspect_ratios=packing.aspect_ratios,
                            multiple=packing.multiple, global_batch=packing.global_batch, seed=packing.seed,
                            out_dir=staging)
        mix.to_parquet(staging / MIX_FILE, index=False)
        per_domain = mix["domain"].value_counts()
        counts.update({f"domain.{name}": int(per_domain.get(name, 0)) for name in settings.domains})
        counts.update({f"shortfall.{name}": n for name, n in shortfall.items()})
        return StageOutput(counts=counts, metrics={f"share.{name}": int(per_domain.get(name, 0)) / max(1, len(mix))
                                                   for name in settings.domains})

    return execute_stage(PACK_MIDTRAIN.name, PACK_MIDTRAIN.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


PACK_MIDTRAIN = StageSpec("pack_midtrain", "packed",
                          {"curated": f"selection_{TOP_STAGE}", "captions": f"captioning_{TOP_STAGE}", "selection": "semantic_selection"},
                          midtrain_packing_settings, run_midtrain_packing)
MIDTRAIN = StageSpec("midtrain", "checkpoint", {"packed": "pack_midtrain", "init": f"pretrain_{TOP_STAGE}"},
                     lambda p: TrainingSettings("midtrain", p.post.midtrain.stage, p.pretrain.trainer()),
                     run_training_stage, distributed=True)
