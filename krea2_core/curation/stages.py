"""The semantic curation stages, embedding then midtraining selection, each a ``StageSpec`` beside its ``run_*``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.common.layout import SUMMARY_FILE
from krea2_core.config import PipelineConfig
from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.embedders import make_embedder, read_embeddings, write_embeddings
from krea2_core.curation.plots import cluster_size_plot, tag_count_plot
from krea2_core.curation.sae import reconstruction_fvu, save_sae
from krea2_core.curation.selection import Candidates, SemanticSelectionSettings, select_for_midtraining
from krea2_core.data.images import BadImage, load_image
from krea2_core.data.schemas import Captions, Verdicts, read_table
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun

EMBEDDINGS_FILE = "embeddings.parquet"
FAILED_FILE = "failed.parquet"
_EMBED_SIDE = 256  # embedders resize to ~224 px: a 256 px decode is enough (and JPEGs decode that small)


def _kept(curated: Path, stage: str) -> pd.DataFrame:
    path = curated / stage / "kept.parquet"
    if not path.parent.is_dir():
        raise ValueError(f"{curated} has no resolution stage {stage!r}; it has {sorted(p.name for p in curated.iterdir() if p.is_dir())}")
    return read_table(path, Verdicts)


@dataclass
class EmbeddingSettings:
    stage: str  # the curated resolution stage whose kept images are embedded
    embedder: EmbedderConfig


def run_embedding(inputs: Mapping[str, Path], settings: EmbeddingSettings, parent_run_id: str = "") -> Path:
    """Embeddings of one stage's kept images; images that fail to load are listed, not fatal."""
    config = settings.embedder

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = _kept(paths["curated"], settings.stage)
        embedder = make_embedder(config)
        ids, vectors, failed = [], [], []
        rows = list(zip(kept["id"], kept["uri"], strict=True))
        for start in tqdm(range(0, len(rows), config.batch_size), desc=f"embed ({embedder.name})", unit="batch"):
            batch_ids, images = [], []
            for row_id, uri in rows[start:start + config.batch_size]:
                try:
                    images.append(load_image(uri, side=_EMBED_SIDE))
                    batch_ids.append(row_id)
                except (BadImage, OSError) as err:
                    failed.append({"id": row_id, "uri": uri, "error": str(err)})
            if images:
                vectors.append(embedder.embed(images))
                ids += batch_ids
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
        write_embeddings(staging / EMBEDDINGS_FILE, ids, matrix, embedder.name)
        pd.DataFrame(failed, columns=["id", "uri", "error"]).to_parquet(staging / FAILED_FILE, index=False)
        return StageOutput(counts={"embedded": len(ids), "failed": len(failed), "dim": int(matrix.shape[1])})

    return execute_stage(EMBEDDING.name, EMBEDDING.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


EMBEDDING = StageSpec("embedding", "embeddings", {"curated": "selection"},
                      lambda p: EmbeddingSettings(stage=p.semantic.stage, embedder=p.semantic.embedder), run_embedding)


def semantic_selection_settings(config: PipelineConfig) -> SemanticSelectionSettings:
    s = config.semantic
    return SemanticSelectionSettings(stage=s.stage, sae=s.sae, kmeans=s.kmeans, dedup=s.dedup, coverage=s.coverage)


def run_semantic_selection(inputs: Mapping[str, Path], settings: SemanticSelectionSettings,
                           parent_run_id: str = "") -> Path:
    """The midtraining sample of one curated stage, with every row's verdict and the reports."""

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = _kept(paths["curated"], settings.stage).set_index("id")
        ids, vectors, _ = read_embeddings(paths["embeddings"] / EMBEDDINGS_FILE)
        caption_of = read_table(paths["captions"] / CAPTIONS_FILE, Captions).set_index("id")["long"]
        rows = kept.loc[ids]
        candidates = Candidates(
            ids=np.asarray(ids), vectors=vectors,
            captions=[caption_of.get(i, "") for i in ids],
            pixels=(rows["width"].to_numpy(np.int64) * rows["height"].to_numpy(np.int64)),
            n_bytes=rows["n_bytes"].fillna(0).to_numpy(np.int64),
        )
        selection = select_for_midtraining(candidates, settings)
        verdicts = selection.verdicts.merge(rows[["uri", "source"]], left_on="id", right_index=True)
        verdicts.to_parquet(staging / "selection.parquet", index=False)
        verdicts[verdicts["kept"]].to_parquet(staging / "sample.parquet", index=False)
        selection.clusters.to_parquet(staging / "clusters.parquet", index=False)
        selection.tags.to_parquet(staging / "tags.parquet", index=False)
        selection.coverage.to_parquet(staging / "coverage.parquet", index=False)
        cluster_size_plot(verdicts, staging / "cluster_sizes.png")
        tag_count_plot(selection.tags, staging / "tag_counts.png")
        for epoch, metrics in enumerate(selection.sae_history):
            run.log_metrics({f"sae.{k}": v for k, v in metrics.items()}, step=epoch)
        save_sae(selection.sae, staging / "sae.safetensors")  # krea2_core.curation.sae.load_sae reads it back
        run.log_metrics({"sae.fvu_all_images": reconstruction_fvu(selection.sae, vectors)})
        lost = selection.coverage[selection.coverage["lost"]]["name"].tolist()
        if lost:
            raise RuntimeError(f"coverage check failed: the sample lost concepts {lost[:20]}")
        reasons = verdicts["reason"].fillna("kept").str.split(":").str[0].value_counts()
        counts = {"input": len(verdicts), "sampled": int(verdicts["kept"].sum()),
                  "added_for_coverage": int(verdicts["added_for_coverage"].sum()),
                  "leaves": len(selection.clusters), "concepts_in_input": len(selection.coverage),
                  "concepts_lost": len(lost), **{f"reason.{k}": int(v) for k, v in reasons.items()}}
        (staging / SUMMARY_FILE).write_text(json.dumps(counts, indent=2, sort_keys=True))
        return StageOutput(counts=counts, metrics=_balance(verdicts))

    return execute_stage(SEMANTIC_SELECTION.name, SEMANTIC_SELECTION.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


SEMANTIC_SELECTION = StageSpec("semantic_selection", "midtrain_selection",
                               {"curated": "selection", "embeddings": "embedding", "captions": "captioning"},
                               semantic_selection_settings, run_semantic_selection)


def _balance(verdicts: pd.DataFrame) -> dict[str, float]:
    """Share of the images that come from the largest quarter of leaf clusters, in the input and in the
    sample: balanced sampling should cut the head's share (leaf sizes themselves need not even out,
    since the budget is split top-down through the hierarchy)."""
    clustered = verdicts[verdicts["leaf"] >= 0]
    sizes = clustered["leaf"].value_counts()
    head = sizes.index[: max(1, len(sizes) // 4)]
    sample = clustered[clustered["kept"]]
    return {"head_leaves_share.input": float(clustered["leaf"].isin(head).mean()),
            "head_leaves_share.sample": float(sample["leaf"].isin(head).mean()) if len(sample) else 0.0}
