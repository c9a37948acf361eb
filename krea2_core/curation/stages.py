"""The semantic curation stages, embedding (reused per image across runs, krea2_core/row_cache.py) then midtraining
selection, of the top resolution stage's curated images, each a ``StageSpec`` beside its ``run_*``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

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
from krea2_core.data.schemas import Captions, read_table
from krea2_core.data.stages import read_kept
from krea2_core.row_cache import COMPUTED_IN, KEY, LINEAGE_FILE, RowCache
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.config import TOP_STAGE

EMBEDDINGS_FILE = "embeddings.parquet"
FAILED_FILE = "failed.parquet"
_EMBED_SIDE = 256  # embedders resize to ~224 px: a 256 px decode is enough (and JPEGs decode that small)


EMBEDDINGS_VERSION = 1  # bump when the code changes an image's embedding under the same embedder config


def embedding_cache(config: EmbedderConfig, root: Path) -> RowCache:
    """Embeddings computed earlier by this embedder (keyed by image content; the batch size changes nothing)."""
    return RowCache(root, "embeddings", {"kind": config.kind, "model_id": config.model_id, "device": config.device},
                    EMBEDDINGS_VERSION)


def planned_embeddings(inputs: Mapping[str, Any], settings: EmbedderConfig, root: Path) -> tuple[int, int]:
    """(to compute, reused) of embedding the ``curated`` input's kept images: what a dry run reports."""
    kept = read_kept(inputs["curated"])
    reused = int(kept["md5"].isin(embedding_cache(settings, root).lookup(kept["md5"])[KEY]).sum())
    return len(kept) - reused, reused


def run_embedding(inputs: Mapping[str, Path], settings: EmbedderConfig, parent_run_id: str = "") -> Path:
    """Embeddings of a curated stage's kept images, reused where an earlier run embedded the same image with the same
    embedder; images that fail to load are listed, not fatal."""

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = read_kept(paths["curated"]).sort_values("id", ignore_index=True)
        cache = embedding_cache(settings, run.output_root)
        found = cache.lookup(kept["md5"])
        todo = kept[~kept["md5"].isin(found[KEY])]
        computed, failed = _embed(todo, settings)
        cache.add(computed.drop(columns="id").drop_duplicates(KEY), run.run_id)
        reused = kept[["id", "md5"]].rename(columns={"md5": KEY}).merge(found, on=KEY, validate="many_to_one")
        rows = pd.concat([reused, computed.assign(**{COMPUTED_IN: run.run_id})], ignore_index=True)
        rows = rows.sort_values("id", ignore_index=True)
        matrix = (np.stack(rows["embedding"].to_numpy()).astype(np.float32) if len(rows)
                  else np.zeros((0, make_embedder(settings).dim), np.float32))
        write_embeddings(staging / EMBEDDINGS_FILE, rows["id"].tolist(), matrix, _name(settings))
        rows[["id", KEY, COMPUTED_IN]].to_parquet(staging / LINEAGE_FILE, index=False)
        pd.DataFrame(failed, columns=["id", "uri", "error"]).to_parquet(staging / FAILED_FILE, index=False)
        return StageOutput(counts={"embedded": len(rows), "computed": len(computed), "reused": len(reused),
                                   "failed": len(failed), "dim": int(matrix.shape[1])})

    return execute_stage(EMBEDDING.name, EMBEDDING.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


def _name(config: EmbedderConfig) -> str:
    return config.model_id if config.kind == "hf" else config.kind


def _embed(todo: pd.DataFrame, config: EmbedderConfig) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """(id, key, embedding) of the rows of ``todo`` that load, and the ones that do not (the model loads only when
    there is work)."""
    ids, keys, vectors, failed = [], [], [], []
    if len(todo):
        embedder = make_embedder(config)
        rows = list(todo[["id", "uri", "md5"]].itertuples(index=False, name=None))
        for start in tqdm(range(0, len(rows), config.batch_size), desc=f"embed ({embedder.name})", unit="batch"):
            images = []
            for row_id, uri, md5 in rows[start:start + config.batch_size]:
                try:
                    images.append(load_image(uri, side=_EMBED_SIDE))
                    ids.append(row_id)
                    keys.append(md5)
                except (BadImage, OSError) as err:
                    failed.append({"id": row_id, "uri": uri, "error": str(err)})
            if images:
                vectors += list(embedder.embed(images).astype(np.float32))
    return pd.DataFrame({"id": ids, KEY: keys, "embedding": vectors}, columns=["id", KEY, "embedding"]), failed


EMBEDDING = StageSpec("embedding", "embeddings", {"curated": f"selection_{TOP_STAGE}"}, lambda p: p.semantic.embedder,
                      run_embedding, planned=planned_embeddings)


def semantic_selection_settings(config: PipelineConfig) -> SemanticSelectionSettings:
    s = config.semantic
    return SemanticSelectionSettings(sae=s.sae, kmeans=s.kmeans, dedup=s.dedup, coverage=s.coverage)


def run_semantic_selection(inputs: Mapping[str, Path], settings: SemanticSelectionSettings,
                           parent_run_id: str = "") -> Path:
    """The midtraining sample of the top resolution stage's curated images, with every row's verdict and the reports."""

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = read_kept(paths["curated"]).set_index("id")
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
                               {"curated": f"selection_{TOP_STAGE}", "embeddings": "embedding",
                                "captions": f"captioning_{TOP_STAGE}"},
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
