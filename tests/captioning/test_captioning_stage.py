"""The captioning stage over curated images: OCR everywhere, scene-graph captions for world images, LLM
captions and rewrites for the rest, per-row errors, resume after a crash, and per-image reuse across selections."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from krea2_core.artifacts import read_manifest
from krea2_core.captioning import worker
from krea2_core.captioning.captioner import TextLlmCaptioner
from krea2_core.captioning.llm import Generated
from krea2_core.captioning.stages import CAPTIONS_FILE, CaptioningSettings, run_captioning, run_scene_captions
from krea2_core.config import load_config
from krea2_core.curation.config import ParallelConfig
from krea2_core.data import stages as data
from krea2_core.data.schemas import Verdicts, write_table
from krea2_core.row_cache import LINEAGE_FILE
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.world.pool import POOL_SCENES_FILE

SERIAL = ParallelConfig(backend="serial")


class FakeLLM:
    """Answers every prompt with a long sentence; raises a crash on the call numbered ``crash_on``."""

    calls = 0
    crash_on: int | None = None

    def generate(self, messages_batch, max_new_tokens):  # noqa: ANN001, ANN201
        FakeLLM.calls += 1
        if FakeLLM.calls == FakeLLM.crash_on:
            raise KeyboardInterrupt("simulated crash")
        return [Generated("a photo of a cat sitting on a red sofa near a window " * 5, False) for _ in messages_batch]


@pytest.fixture
def curated(isolated_outputs: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(worker.LocalChatLLM, "load", classmethod(lambda cls, model_id, device="auto": FakeLLM()))
    monkeypatch.setattr(worker, "make_captioner", lambda config: TextLlmCaptioner(config, llm=FakeLLM()))
    FakeLLM.calls, FakeLLM.crash_on = 0, None
    config = load_config("tiny", {"world": {"n_scenes": 10, "n_exact_duplicates": 1, "n_near_duplicates": 1,
                                            "n_color_variants": 1, "n_per_defect": 1, "real_image_dirs": ["skimage"],
                                            "max_real_images": 3}})
    world = data.run_world_pool({}, config.world)
    raw_pool = data.run_ingest({"world_pool": world}, None, parallel=SERIAL)
    scores = data.run_scoring({"raw_pool": raw_pool}, config.curation.analysis, parallel=SERIAL)
    selection = data.selection_spec("256")
    selected = selection.run({"raw_pool": raw_pool, "scores": scores}, selection.settings(config))
    scenes = run_scene_captions({"world_pool": world, "raw_pool": raw_pool})
    return {"world": world, "curated": selected, "scenes": scenes}


def _caption(paths: dict[str, Path], stage: str = "256", **overrides: object) -> tuple[Path, dict[str, int]]:
    config = load_config("tiny", {"captioning": {"shard_size": 4, **overrides}}).captioning
    path = run_captioning({"curated": paths["curated"], "scene_captions": paths["scenes"]},
                          CaptioningSettings(stage=stage, captioning=config), parallel=SERIAL)
    return path, read_manifest(path, kind="captions").counts


def test_world_images_keep_exact_captions_and_ocr_reads_their_text(curated: dict[str, Path]) -> None:
    path, counts = _caption(curated)
    captions = pd.read_parquet(path / CAPTIONS_FILE)
    scenes = pd.read_parquet(curated["world"] / POOL_SCENES_FILE)
    world = captions[captions["source"] == "scene_graph"]
    assert len(world) >= 8 and counts["errors"] == 0
    by_long = scenes.drop_duplicates("long").set_index("long")  # copies share their original's caption
    texts = [json.loads(by_long.loc[long, "scene"])["text"] for long in world["long"]]
    with_text = [(ocr, t) for ocr, t in zip(world["ocr_text"], texts, strict=True) if t]
    assert with_text and all(t in ocr.replace(" ", "").upper() for ocr, t in with_text), with_text
    lines = [json.loads(v) for v, t in zip(world["ocr_lines"], texts, strict=True) if t]
    assert all(line and all(len(entry["box"]) == 4 for entry in line) for line in lines)
    assert (world.loc[[bool(t) for t in texts], "text_density"] > 0).all()
    assert (world["tags"] != "").all() and world["conversational"].str.startswith("Could you make me").all()


def test_other_images_get_llm_captions_and_variants_within_limits(curated: dict[str, Path]) -> None:
    path, counts = _caption(curated)
    real = pd.read_parquet(path / CAPTIONS_FILE).query("source == 'text_llm'")
    assert len(real) >= 1 and counts["source.text_llm"] == len(real)
    limits = load_config("tiny").captioning.rewriter
    assert (real["short"].str.split().str.len() <= limits.short_words).all()
    assert (real["medium"].str.split().str.len() <= limits.medium_words).all()
    assert (real["tags"].str.split(",").str.len() <= limits.tags).all()
    assert real["flags"].str.contains("short_truncated").all()  # the fake answers are over-long: cut and flagged


def test_unreadable_image_is_a_recorded_error(curated: dict[str, Path]) -> None:
    kept = pd.read_parquet(curated["curated"] / data.KEPT_FILE)
    Path(kept["uri"].iloc[0]).unlink()
    path, counts = _caption(curated)
    captions = pd.read_parquet(path / CAPTIONS_FILE).set_index("id")
    assert counts["errors"] == 1 and "FileNotFoundError" in captions.loc[kept["id"].iloc[0], "error"]
    assert captions.drop(index=kept["id"].iloc[0])["error"].isna().all()


def test_a_crashed_run_resumes_from_its_finished_shards(curated: dict[str, Path]) -> None:
    FakeLLM.crash_on = 1  # the first LLM call: the shard holding the first non-world image
    with pytest.raises(KeyboardInterrupt):
        _caption(curated, shard_size=2)
    FakeLLM.crash_on = None
    _, counts = _caption(curated, shard_size=2)
    assert counts["shards_resumed"] >= 1 and counts["errors"] == 0


def _lineage(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / LINEAGE_FILE).set_index("id")


def _curated_without(paths: dict[str, Path], dropped: list[str]) -> Path:
    """A curated artifact of the fixture's kept rows but ``dropped`` (as a stricter selection would publish)."""
    kept = data.read_kept(paths["curated"])

    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(kept[~kept["id"].isin(dropped)], staging / data.KEPT_FILE, Verdicts)
        return StageOutput(counts={"kept": len(kept) - len(dropped)})

    return execute_stage("selection_256", "curated", body, config={"without": dropped})[0]


def test_captions_are_computed_once_per_image_and_settings(curated: dict[str, Path]) -> None:
    """A selection that adds images captions exactly those (the issue's "adding 10 images"), another stage's
    selection of the same images reuses all of them, and a captioner setting re-captions every image but reuses
    its OCR. Each artifact's lineage names the run that computed each row."""
    kept = data.read_kept(curated["curated"]).sort_values("id")
    real = kept[~kept["id"].isin(pd.read_parquet(curated["scenes"] / "scene_captions.parquet")["id"])]
    added = sorted({*kept["id"].iloc[::3], real["id"].iloc[0]})  # some world images and a real one
    smaller, counts = _caption({**curated, "curated": _curated_without(curated, added)})
    assert (counts["computed"], counts["reused"]) == (len(kept) - len(added), 0)
    calls = FakeLLM.calls
    full, counts = _caption(curated)
    assert (counts["computed"], counts["reused"]) == (len(added), len(kept) - len(added))
    first, second = _lineage(smaller), _lineage(full)
    assert set(second.index[second["computed_in"] != first["computed_in"].iloc[0]]) == set(added)
    # reused rows are the rows computed before, byte for byte
    old, new = (pd.read_parquet(p / CAPTIONS_FILE).set_index("id") for p in (smaller, full))
    assert new.loc[old.index].equals(old)
    assert FakeLLM.calls > calls  # the added real images needed the LLM
    calls = FakeLLM.calls
    other_stage, counts = _caption(curated, stage="512")
    assert (counts["computed"], counts["reused"]) == (0, len(kept)) and FakeLLM.calls == calls  # no model ran
    assert pd.read_parquet(other_stage / CAPTIONS_FILE).equals(pd.read_parquet(full / CAPTIONS_FILE))
    recaptioned, counts = _caption(curated, captioner={"max_new_tokens": 32})
    assert (counts["computed"], counts["reused"], counts["ocr_reused"]) == (len(kept), 0, len(kept))
    assert pd.read_parquet(recaptioned / CAPTIONS_FILE)["ocr_text"].equals(pd.read_parquet(full / CAPTIONS_FILE)["ocr_text"])
    changed_shards, counts = _caption(curated, shard_size=5)  # a new artifact key, the same captions: all reused
    assert (counts["computed"], counts["reused"]) == (0, len(kept))


def test_failed_rows_are_not_reused(curated: dict[str, Path]) -> None:
    kept = data.read_kept(curated["curated"])
    moved = Path(kept["uri"].iloc[0])
    moved.rename(moved.with_suffix(".away"))
    _, counts = _caption(curated)
    assert counts["errors"] == 1
    moved.with_suffix(".away").rename(moved)  # a transient failure: the next run computes that row again
    path, counts = _caption(curated, shard_size=5)
    assert (counts["computed"], counts["errors"]) == (1, 0)
    assert pd.read_parquet(path / CAPTIONS_FILE)["error"].isna().all()
