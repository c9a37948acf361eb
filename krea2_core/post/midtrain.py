"""Midtraining data: a top-down mix. The domains and sources come first (``MidtrainConfig.domains``, in order,
each at its share of ``n_images``); each is filled from the semantic-curation sample (cluster-balanced,
deduplicated, coverage-checked) of the highest-resolution curated stage, then packed like a pretraining stage.

Artifact (kind ``packed``): the packed shards plus ``mix.parquet`` (id, uri, source, domain of every chosen
image) so a midtrained checkpoint traces back to the exact images and the domain each was chosen for.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from krea2_core.artifacts import Manifest, read_manifest, to_plain
from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.config import MidtrainConfig, PackingConfig, PretrainConfig
from krea2_core.data.packing import pack_stage, packing_config
from krea2_core.data.schemas import Captions, Verdicts, read_table
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun

MIX_FILE = "mix.parquet"
SAMPLE_FILE = "sample.parquet"  # the semantic selection's kept rows


def top_stage(pretrain: PretrainConfig) -> str:
    """The pretraining stage with the highest resolution: where midtraining continues."""
    return max(pretrain.stages, key=lambda name: pretrain.stages[name].resolution)


def select_mix(sample: pd.DataFrame, captions: pd.DataFrame, config: MidtrainConfig, seed: int
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


def midtrain_packing(pretrain: PretrainConfig, config: MidtrainConfig) -> PackingConfig:
    """How the midtraining images are packed: the top pretraining stage's buckets at midtraining's batch size."""
    return dataclasses.replace(packing_config(pretrain, top_stage(pretrain)), resolution=config.stage.resolution,
                               global_batch=config.stage.global_batch)


def midtrain_packing_view(config: MidtrainConfig, packing: PackingConfig) -> dict[str, Any]:
    """What the midtraining shards depend on (the packing stage's cache key)."""
    return {"mix": to_plain(config.domains), "n_images": config.n_images, "packing": to_plain(packing)}


def run_midtrain_packing(curated: Path, captions: Path, selection: Path, config: MidtrainConfig,
                         packing: PackingConfig, *, parent_run_id: str = "", root: Path | None = None
                         ) -> tuple[Path, Manifest]:
    """Choose the midtraining mix from the semantic ``selection`` and pack it with ``packing`` (from
    ``midtrain_packing``; a ``packed`` artifact)."""
    read_manifest(curated, kind="curated")
    read_manifest(captions, kind="captions")
    read_manifest(selection, kind="midtrain_selection")

    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        texts = read_table(inputs["captions"] / CAPTIONS_FILE, Captions)
        mix, shortfall = select_mix(pd.read_parquet(inputs["selection"] / SAMPLE_FILE), texts, config, packing.seed)
        kept = read_table(inputs["curated"] / packing.stage / "kept.parquet", Verdicts)
        kept = kept[kept["id"].isin(mix["id"])]
        counts = pack_stage(kept, texts, resolution=packing.resolution, aspect_ratios=packing.aspect_ratios,
                            multiple=packing.multiple, global_batch=packing.global_batch, seed=packing.seed,
                            out_dir=staging)
        mix.to_parquet(staging / MIX_FILE, index=False)
        per_domain = mix["domain"].value_counts()
        counts.update({f"domain.{name}": int(per_domain.get(name, 0)) for name in config.domains})
        counts.update({f"shortfall.{name}": n for name, n in shortfall.items()})
        return StageOutput(counts=counts, metrics={f"share.{name}": int(per_domain.get(name, 0)) / max(1, len(mix))
                                                   for name in config.domains})

    return execute_stage("pack_midtrain", "packed", body, config=midtrain_packing_view(config, packing),
                         inputs={"curated": curated, "captions": captions, "selection": selection},
                         parent_run_id=parent_run_id, root=root)
