"""The presets hold the values docs/presets.md explains: each expectation here is typed from that page (and the
GPU presets' shape from docs/architecture.md), not read from the code, so a changed preset value fails here until
its reason is updated too."""

from typing import Any

import pytest

from krea2_core.presets import preset

TINY = {
    "curation.stages.256.min_side": 32,
    "curation.stages.512.min_side": 64,
    "curation.stages.1024.min_side": 128,
    "curation.stages.256.min_pixel_correlation": 0.4,
    "curation.stages.512.min_pixel_correlation": 0.4,
    "curation.stages.1024.min_pixel_correlation": 0.4,
    "curation.analysis.colorhash_binbits": 5,
    "pretrain.model.num_layers": 4,
    "pretrain.model.num_attention_heads": 4,
    "pretrain.model.attention_head_dim": 32,
    "pretrain.model.in_channels": 48,
    "pretrain.model.num_layerwise_text_blocks": 0,
    "pretrain.model.num_refiner_text_blocks": 0,
    "pretrain.text_encoder.max_tokens": 80,
    "pretrain.text_encoder.cache_mb": 1024,
    "pretrain.parallel.device": "cpu",
    "pretrain.parallel.dtype": "float32",
    "pretrain.stages.256.resolution": 32,
    "pretrain.stages.512.resolution": 48,
    "pretrain.stages.1024.resolution": 64,
    "pretrain.stages.256.repa": True,
    "pretrain.stages.256.world_scenes.n": 500,
    "pretrain.stages.512.world_scenes.n": 500,
    "pretrain.stages.1024.world_scenes.n": 500,
    "post.sft.stage.lr": 5e-5,
    "post.merge.method": "uniform",
    "post.preference.synthetic.lr": 1e-4,
    "post.rl.rewards.weights.aesthetic": 0.0,
    "expander.sft.steps": 12,
    "expander.sft.lr": 1e-4,
}
GPU = {  # small and full alike
    "curation.stages.256.min_side": 256,
    "curation.stages.512.min_side": 512,
    "curation.stages.1024.min_side": 1024,
    "captioning.captioner.kind": "vlm",
    "captioning.gpu_fraction": 0.25,
    "pretrain.autoencoder.kind": "qwen_image",
    "pretrain.autoencoder.patch_size": 2,
    "pretrain.text_encoder.layers": [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36],
    "pretrain.parallel.dtype": "bfloat16",
    "pretrain.stages.256.float8": "tensorwise",
    "pretrain.stages.512.float8": "rowwise",
    "pretrain.stages.1024.float8": "none",
    "post.resolution": 1024,
    "post.rl.rewards.weights.aesthetic": 0.5,
    "post.rl.grpo.group_size": 16,
    "post.rl.grpo.sample_steps": 10,
}
SMALL = {**GPU, "pretrain.model.num_layers": 16, "pretrain.model.num_attention_heads": 16,
         "pretrain.parallel.nnodes": 1, "pretrain.parallel.nproc_per_node": 1, "pretrain.parallel.tp": 1}
FULL = {**GPU, "pretrain.model.num_layers": 28, "pretrain.model.num_attention_heads": 48,
        "pretrain.model.attention_head_dim": 128, "pretrain.parallel.nnodes": 8,
        "pretrain.parallel.nproc_per_node": 8, "pretrain.parallel.tp": 2}


def _at(data: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        data = data[key]
    return data


@pytest.mark.parametrize(("name", "expected"), [("tiny", TINY), ("small", SMALL), ("full", FULL)])
def test_presets_hold_the_documented_values(name: str, expected: dict[str, Any]) -> None:
    data = preset(name).to_dict()
    assert {path: _at(data, path) for path in expected} == expected


def test_hidden_sizes_are_the_documented_ones() -> None:
    assert [preset(name).pretrain.model.hidden_size for name in ("tiny", "small", "full")] == [128, 2048, 6144]
