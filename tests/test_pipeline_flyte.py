"""The Flyte entry points as a user runs them: `pyflyte run` in a subprocess with its own local cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig, deep_merge, load_config
from krea2_core.rerun import plan
from krea2_core.stage_spec import stage_specs
from krea2_core.tracking import configure_tracking, output_location
from expander._llm import save_tiny_qwen3

REPO = Path(__file__).resolve().parents[1]
SMALL = """
world:
  n_scenes: 24
  n_exact_duplicates: 3
  n_near_duplicates: 4
  n_color_variants: 2
  n_per_defect: 1
  real_image_dirs: []  # world images only: their captions come from scene graphs, no LLM in this test
semantic:
  sae: {n_features: 32, k: 4, epochs: 5}
  kmeans: {levels: [6, 2]}
curation:
  parallel: {shard_size: 16}
pretrain:  # a 2-block model, a few steps per stage: the real code path, on 2 torchrun ranks
  model: {num_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 128,
          text_intermediate_size: 256}
  text_encoder: {max_tokens: 32}
  eval: {n_prompts: 4, steps: 3}
  aspect_ratios: [1.0]
  stages:
    "256": {steps: 4, global_batch: 8, warmup_steps: 1, pma_checkpoints: 2, pma_interval: 2, world_scenes: {n: 8}}
    "512": {steps: 2, global_batch: 8, warmup_steps: 0, pma_checkpoints: 1, world_scenes: {n: 8}}
    "1024": {steps: 2, global_batch: 4, warmup_steps: 0, pma_checkpoints: 1, world_scenes: {n: 8}}
post:  # every post-training stage for a step or two, at 32 px
  resolution: 32
  midtrain: {n_images: 8, stage: {steps: 2, global_batch: 4, warmup_steps: 0, pma_checkpoints: 1}}
  sft:
    domains: {warm: {n_images: 8}, cool: {n_images: 8}}
    stage: {resolution: 32, steps: 2, global_batch: 8, warmup_steps: 0, pma_checkpoints: 1}
    eval_prompts: 2
  merge: {compare: false}
  preference:
    pairs: {n_prompts: 12, min_margin: 0.0, policy: {steps: 2},
            opponents: [{checkpoint: previous, steps: 2}, {steps: 1, cfg_scale: 1.0}]}
    synthetic: {steps: 2, global_batch: 4, warmup_steps: 0}
    calibration: {steps: 1, global_batch: 2, warmup_steps: 0}
    simulated_annotations: 8
    eval_prompts: 2
  rl:  # two reward actors: the rubric and the aesthetic model trained here (each reward is tested on its own)
    rewards: {weights: {rubric: 1.0, aesthetic: 0.5, text: 0.0, artifact: 0.0}}
    reward_model: {steps: 5}
    pool: {n_prompts: 4, min_active: 2}
    grpo: {steps: 1, prompts_per_step: 2, group_size: 2, sample_steps: 2, train_timesteps: 1, warmup_steps: 0}
    eval_prompts: 2
    diversity_prompts: 1
    diversity_samples: 2
  distill: {student_steps: 2, steps: 1, batch: 2, warmup_steps: 0, n_prompts: 4, eval_prompts: 2,
            teacher_eval_steps: 3}
expander:  # a tiny random LLM (TINY_LLM: written by the test) writes the pairs and is finetuned: the real code path
  expansion: {max_new_tokens: 16}
  data: {writer_model: TINY_LLM, n_pairs: 6, batch_size: 6, max_new_tokens: 8}
  sft: {model_id: TINY_LLM, steps: 2, batch_size: 2, warmup_steps: 0, eval_prompts: 2}
  rl: {steps: 1, prompts_per_step: 2, group_size: 2, n_prompts: 4, n_candidates: 2, image_steps: 2, warmup_steps: 0,
       eval_prompts: 2, diversity_prompts: 1, diversity_samples: 2}
"""
POST_TRAINING = ("pack_midtrain", "midtrain", "sft_data_warm", "sft_data_cool", "sft_warm", "sft_cool", "merge",
                 "preference_pairs", "preference_synthetic", "preference_annotations", "preference_calibration",
                 "reward_model", "rl", "distill")
EXPANDER = ("expander_data", "expander_sft", "expander_rl")
# one setting of each post-training stage, none at SMALL's value -> the stages whose settings it is in (the SFT
# recipe is every domain's)
ONE_SETTING = {
    ("pack_midtrain",): {"midtrain": {"n_images": 6}},
    ("midtrain",): {"midtrain": {"stage": {"lr": 2e-4}}},
    ("sft_data_warm",): {"sft": {"domains": {"warm": {"n_images": 16}}}},
    ("sft_warm", "sft_cool"): {"sft": {"stage": {"lr": 1e-4}}},
    ("merge",): {"merge": {"method": "ties"}},
    ("preference_pairs",): {"preference": {"pairs": {"n_prompts": 10}}},
    ("preference_synthetic",): {"preference": {"synthetic": {"lr": 2e-4}}},
    ("preference_annotations",): {"preference": {"simulated_label_noise": 0.3}},
    ("preference_calibration",): {"preference": {"calibration": {"lr": 1e-4}}},
    ("reward_model",): {"rl": {"reward_model": {"steps": 6}}},
    ("rl",): {"rl": {"grpo": {"lr": 3e-5}}},
    ("distill",): {"distill": {"lr": 2e-5}},
}


def _with(base: str, **changes: dict) -> str:
    """``base`` YAML with ``changes`` merged in (the way the pipeline merges overrides into a preset)."""
    return yaml.safe_dump(deep_merge(yaml.safe_load(base), changes))


def _pyflyte(home: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "KREA2_OUTPUT_ROOT": str(root), "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    pyflyte = Path(sys.executable).with_name("pyflyte")
    return subprocess.run([str(pyflyte), "run", *args], cwd=REPO, env=env, text=True, capture_output=True, timeout=600)


def _downstream(stages: tuple[str, ...], config: PipelineConfig) -> set[str]:
    """``stages`` and every stage that takes an input from one of them, transitively (in the specs' graph)."""
    found = set(stages)
    for name, spec in stage_specs(tuple(config.post.sft.domains)).items():
        if any(producer in found and spec.takes(input_name, config) for input_name, producer in spec.inputs.items()):
            found.add(name)
    return found


def _reruns(run_id: str, config: PipelineConfig) -> set[str]:
    return {stage for stage, reruns, _ in plan(run_id, config) if reruns}


def _stage_runs(root: Path) -> dict[str, list[str]]:
    experiment = configure_tracking(root)
    runs = MlflowClient().search_runs([experiment], filter_string="tags.`krea2.kind` = 'stage'",
                                      order_by=["attributes.start_time DESC"])  # newest first
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.data.tags["krea2.stage"], []).append(run.info.run_id)
    return found


def test_pipeline_runs_caches_and_reruns_only_what_changed(tmp_path: Path, isolated_outputs: Path) -> None:
    home, root = tmp_path / "home", isolated_outputs
    small_config = SMALL.replace("TINY_LLM", str(save_tiny_qwen3(tmp_path / "llm")))
    small = tmp_path / "small.yaml"
    small.write_text(small_config)

    first = _pyflyte(home, root, "workflows/end_to_end.py", "krea2_pipeline", "--config", str(small))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "krea2 pipeline finished" in first.stdout
    runs = _stage_runs(root)
    training = tuple(f"{kind}_{stage}" for stage in ("256", "512", "1024") for kind in ("pack", "pretrain"))
    stages = ("world_pool", "ingest", "scoring", *(f"selection_{s}" for s in ("256", "512", "1024")), "scene_captions",
              *(f"captioning_{s}" for s in ("256", "512", "1024")), "embedding", "semantic_selection", *training,
              *POST_TRAINING, *EXPANDER)
    assert {stage: len(ids) for stage, ids in runs.items()} == dict.fromkeys(stages, 1)

    second = _pyflyte(home, root, "workflows/end_to_end.py", "krea2_pipeline", "--config", str(small))
    assert second.returncode == 0, second.stderr[-3000:]
    assert _stage_runs(root) == runs  # every stage was a cache hit: no new stage run
    # and the dry run reads back every stage's recorded config, post-training included, as unchanged
    latest = MlflowClient().search_runs([configure_tracking(root)], filter_string="tags.`krea2.kind` = 'pipeline'",
                                        order_by=["start_time DESC"])[0]
    steps = plan(latest.info.run_id, load_config("tiny", small_config))
    assert [stage for stage, _, _ in steps] == list(stages) and not any(reruns for _, reruns, _ in steps), steps

    changed = tmp_path / "changed.yaml"  # drops the 512 stage's world images below 200 px: the other stages keep theirs
    changed.write_text(_with(small_config, curation={"stages": {"512": {"min_side": 200}}}))
    dry_run = {stage: why for stage, reruns, why in plan(latest.info.run_id, load_config("tiny", changed.read_text()))
               if reruns}
    third = _pyflyte(home, root, "workflows/end_to_end.py", "krea2_pipeline", "--config", str(changed))
    assert third.returncode == 0, third.stderr[-3000:]
    after = _stage_runs(root)
    # The case: a 512 threshold re-runs the 512 stage's selection, captioning, packing and training and what
    # follows them, never the 256 stage's (nor the 1024 stage's selection, captions, packing, embedding or semantic
    # selection); the 512 stage's captioning computes nothing (each image it keeps was captioned before). This small
    # config's 32 px PNG samples can come out identical from checkpoints that differ slightly, so the PO pairs may
    # land where they did: the reward model, RL and distillation re-run exactly when their inputs moved (checked at
    # the end); so does the expander's RL.
    moved_only = {"reward_model", "rl", "distill", "expander_rl"}
    downstream = {"selection_512", "captioning_512", "pack_512", "pretrain_512", "pretrain_1024", "midtrain",
                  "sft_warm", "sft_cool", "merge", "preference_pairs", "preference_synthetic",
                  "preference_annotations", "preference_calibration"}
    assert {stage: len(ids) for stage, ids in after.items() if stage not in moved_only} == {
        s: 1 + (s in downstream) for s in stages if s not in moved_only}
    assert set(dry_run) == downstream | moved_only  # the dry run said so beforehand, and how much captioning reuses
    captions_512 = read_manifest(output_location(MlflowClient().get_run(after["captioning_512"][0]).data.tags, root))
    assert captions_512.counts["computed"] == 0 and captions_512.counts["reused"] == captions_512.counts["images"]
    assert dry_run["captioning_512"].endswith(f"; 0 images to compute, {captions_512.counts['reused']} reused")

    # Every stage's settings are its Flyte task's only config input and its artifact key, so one setting re-runs its
    # stage and what is downstream of it, and the dry run says so: for one setting of each post-training stage, and
    # for a training setting of the last resolution stage (which re-packs nothing) ...
    latest = MlflowClient().search_runs([configure_tracking(root)], filter_string="tags.`krea2.kind` = 'pipeline'",
                                        order_by=["start_time DESC"])[0].info.run_id
    base = yaml.safe_load(changed.read_text())
    for changed_stages, change in ONE_SETTING.items():
        config = load_config("tiny", deep_merge(base, {"post": change}))
        assert _reruns(latest, config) == _downstream(changed_stages, config), changed_stages
    longer_1024 = load_config("tiny", deep_merge(base, {"pretrain": {"stages": {"1024": {"steps": 3}}}}))
    assert _reruns(latest, longer_1024) == _downstream(("pretrain_1024",), longer_1024)
    # ... and Flyte does what the dry run says: the case, distillation's lr, re-runs distillation and the
    # expander's RL (trained through the distilled model) and nothing else
    lr = tmp_path / "lr.yaml"
    lr.write_text(_with(changed.read_text(), post=ONE_SETTING[("distill",)]))
    planned = _reruns(latest, load_config("tiny", lr.read_text()))
    assert planned == {"distill", "expander_rl"}
    fourth = _pyflyte(home, root, "workflows/end_to_end.py", "krea2_pipeline", "--config", str(lr))
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    final = _stage_runs(root)
    assert {stage for stage in stages if len(final[stage]) > len(after[stage])} == planned

    # the newest parent run links the stage runs it used, including the cached ones
    client = MlflowClient()
    parents = client.search_runs([configure_tracking(root)], filter_string="tags.`krea2.kind` = 'pipeline'",
                                 order_by=["start_time DESC"])
    assert len(parents) == 4 and all(p.info.status == "FINISHED" for p in parents)

    def used(parent: Run, stage: str) -> str:
        """The content digest of the output of ``stage`` that pipeline execution ``parent`` used."""
        return client.get_run(parent.data.tags[f"krea2.stage_run.{stage}"]).data.tags["krea2.output_digest"]

    def settings(parent: Run, stage: str) -> frozenset[tuple[str, str]]:
        """The settings (MLflow params) of the run of ``stage`` that pipeline execution ``parent`` used."""
        return frozenset(client.get_run(parent.data.tags[f"krea2.stage_run.{stage}"]).data.params.items())

    # content addressing: no output was computed twice (one run per artifact location), and a stage ran once per
    # distinct content of its inputs and settings: RL per (calibrated checkpoint, reward model), distillation per
    # (RL checkpoint, its settings), the expander's stages per captions, pairs, and (SFT model, distilled model)
    for stage in stages:
        locations = [output_location(client.get_run(run_id).data.tags, root) for run_id in final[stage]]
        assert len(set(locations)) == len(locations), stage
    assert len(final["rl"]) == len({(used(p, "preference_calibration"), used(p, "reward_model")) for p in parents})
    assert len(final["distill"]) == len({(used(p, "rl"), settings(p, "distill")) for p in parents})
    assert len(final["expander_data"]) == len({used(p, "captioning_256") for p in parents})
    assert len(final["expander_sft"]) == len({used(p, "expander_data") for p in parents})
    assert len(final["expander_rl"]) == len({(used(p, "expander_sft"), used(p, "distill")) for p in parents})
    tags = parents[0].data.tags
    assert {k.removeprefix("krea2.stage_run.") for k in tags if k.startswith("krea2.stage_run.")} == set(stages)
    assert tags["krea2.stage_run.scoring"] == runs["scoring"][0]
    assert tags["krea2.stage_run.selection_512"] in after["selection_512"]
    assert tags["krea2.stage_run.selection_512"] not in runs["selection_512"]
    assert tags["krea2.stage_run.pretrain_256"] == runs["pretrain_256"][0]  # the 512 change left it a cache hit

    # a sub-workflow runs alone on a previous execution's artifacts
    def output_of(stage: str) -> str:
        return str(output_location(client.get_run(tags[f"krea2.stage_run.{stage}"]).data.tags, root))

    alone = _pyflyte(home, root, "workflows/semantic_curation.py", "semantic_curation",
                     "--curated", output_of("selection_1024"), "--captions", output_of("captioning_1024"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert len(_stage_runs(root)["semantic_selection"]) == 2  # the default (tiny) config differs from SMALL's


def test_bad_config_fails_with_the_key_named(tmp_path: Path, isolated_outputs: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('curation:\n  stages:\n    "256": {min_side: -5}\n')
    result = _pyflyte(tmp_path / "home", isolated_outputs, "workflows/end_to_end.py", "krea2_pipeline", "--config", str(bad))
    assert result.returncode != 0
    assert "curation.stages.256: min_side must be >= 1, got -5" in result.stdout + result.stderr


def test_a_workflow_run_alone_reads_its_config_like_the_cli(tmp_path: Path, isolated_outputs: Path) -> None:
    """pyflyte's own dataclass inputs ignore unknown keys and take partial overrides as whole configs: every entry
    point takes a preset and YAML overrides instead, through krea2's strict loader."""
    bad = tmp_path / "typo.yaml"
    bad.write_text("curation:\n  parallel: {parallell: 4}\n")
    result = _pyflyte(tmp_path / "home", isolated_outputs, "workflows/curation.py", "curation", "--source",
                      str(tmp_path), "--config", str(bad))
    assert result.returncode != 0
    assert "curation.parallel: unknown key(s) ['parallell']" in result.stdout + result.stderr


def test_curation_workflow_runs_alone_on_an_image_folder(tmp_path: Path, isolated_outputs: Path) -> None:
    import shutil

    import skimage

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, folder / name)
    shutil.copy(folder / "coffee.png", folder / "coffee_copy.png")
    (folder / "readme.txt").write_text("not an image")
    # a partial override: the rest of the curation config stays the preset's
    result = _pyflyte(tmp_path / "home", isolated_outputs, "workflows/curation.py", "curation", "--source", str(folder),
                      "--overrides", "curation: {parallel: {backend: serial}}")
    assert result.returncode == 0, result.stderr[-3000:]

    curated = {pd.read_parquet(path)["stage"].iloc[0]: path
               for path in (isolated_outputs / "artifacts" / "curated").glob("*/verdicts.parquet")}
    assert sorted(curated) == ["1024", "256", "512"]  # one artifact per resolution stage
    verdicts = pd.read_parquet(curated["256"]).assign(file=lambda f: f["uri"].map(lambda u: Path(u).name)).set_index("file")
    assert verdicts.loc["readme.txt", "reason"] == "not_an_image"
    assert sorted(verdicts.loc[["coffee.png", "coffee_copy.png"], "reason"].fillna("kept")) == ["exact_duplicate", "kept"]
    assert verdicts.loc[["astronaut.png", "rocket.jpg"], "kept"].all()


def test_captioning_reuses_every_image_it_captioned_before(tmp_path: Path, isolated_outputs: Path) -> None:
    """The issue's cases through `pyflyte run`: adding 10 images to a pool captions exactly those 10, and a captioner
    setting re-captions every image (reusing its OCR). World images (scene-graph captions: no LLM) in a folder."""
    import shutil

    from krea2_core.data.stages import WORLD_POOL
    from krea2_core.stage_spec import run_stage
    from krea2_core.world.pool import POOL_IMAGES_DIR

    home, root = tmp_path / "home", isolated_outputs
    world = run_stage(WORLD_POOL, load_config("tiny", {"world": {
        "n_scenes": 30, "n_exact_duplicates": 0, "n_near_duplicates": 0, "n_color_variants": 0, "n_per_defect": 0,
        "real_image_dirs": []}}), {})
    scenes = sorted((world / POOL_IMAGES_DIR).glob("scene_*"))
    folder = tmp_path / "pool"
    folder.mkdir()
    serial = "curation: {parallel: {backend: serial}}"

    def curate_and_caption(*overrides: str) -> tuple[set[str], dict[str, int]]:
        """(the ids the 256 stage kept, the counts of the captions it got)."""
        curated = _pyflyte(home, root, "workflows/curation.py", "curation", "--source", str(folder), "--overrides",
                           serial)
        assert curated.returncode == 0, curated.stderr[-3000:]
        client = MlflowClient()
        selection = client.get_run(_stage_runs(root)["selection_256"][0])  # newest first
        kept = output_location(selection.data.tags, root)
        raw_pool = output_location(client.get_run(selection.data.tags["krea2.upstream.raw_pool"]).data.tags, root)
        captioned = _pyflyte(home, root, "workflows/captioning.py", "captioning", "--curated", str(kept), "--stage",
                             "256", "--world_pool", str(world), "--raw_pool", str(raw_pool),
                             "--overrides", "\n".join([serial, *overrides]))
        assert captioned.returncode == 0, captioned.stderr[-3000:]
        captions = client.get_run(_stage_runs(root)["captioning_256"][0])
        counts = read_manifest(output_location(captions.data.tags, root)).counts
        return set(pd.read_parquet(kept / "kept.parquet")["id"]), counts

    for image in scenes[:20]:
        shutil.copy(image, folder / image.name)
    first, counts = curate_and_caption()
    assert counts["computed"] == len(first) >= 18 and counts["reused"] == 0 and counts["source.scene_graph"] == len(first)
    for image in scenes[20:30]:
        shutil.copy(image, folder / image.name)
    second, counts = curate_and_caption()
    assert len(second - first) == 10 and first <= second
    assert (counts["computed"], counts["reused"]) == (10, len(first))
    third, counts = curate_and_caption("captioning: {captioner: {max_new_tokens: 32}}")
    assert third == second
    assert (counts["computed"], counts["reused"], counts["ocr_reused"]) == (len(second), 0, len(second))
