"""Self-describing checkpoints: a published directory rebuilds its text-to-image model alone; a directory without
its index, or a pair of checkpoints of different models, is refused with a clear error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from krea2_core.training.config import TrainParallelConfig
from krea2_core.post.pairs import load_pipes
from krea2_core.training.diffusers_format import DIFFUSERS_CONFIG_FILE, DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.image_model import (MODEL_INDEX_FILE, ModelIndex, load_text_to_image, new_model,
                                             publish_checkpoint, text_to_image)

from post._checkpoints import PRETRAIN

CPU = torch.device("cpu")
# another way to run the same model: how it runs is the caller's, not the checkpoint's
RUN = TrainParallelConfig(nproc_per_node=1, dtype="float32", compile=True)


def _published(directory: Path, index: ModelIndex, prefix: str = "") -> tuple[Path, torch.nn.Module]:
    model = new_model(index.model, CPU, seed=3)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # a fresh output layer is zero: no signal
    weights = directory.parent / f"{directory.name}.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()} | ({"other.x": torch.ones(1)}
                                                                                    if prefix else {}), weights)
    directory.mkdir()
    publish_checkpoint(directory, weights, index, prefix=prefix)
    return directory, model


def test_a_published_checkpoint_rebuilds_its_model_from_the_directory_alone(tmp_path: Path) -> None:
    index = ModelIndex.of(PRETRAIN)
    out, model = _published(tmp_path / "ckpt", index)
    assert {DIFFUSERS_WEIGHTS_FILE, DIFFUSERS_CONFIG_FILE, MODEL_INDEX_FILE} == {p.name for p in out.iterdir()}
    assert ModelIndex.read(out) == index
    loaded = load_text_to_image(out, RUN, CPU, seed=0)
    reference = text_to_image(model.eval(), index, RUN, CPU)
    assert loaded.drop_text_padding is False and loaded.patch_size == index.autoencoder.patch_size
    prompts = ["a red circle", "two blue squares on a green background"]
    images = [pipe.generate(prompts, width=32, height=32, steps=2, cfg_scale=2.0, shift=1.0, seed=1)
              for pipe in (loaded, reference)]
    assert [list(i.getdata()) for i in images[0]] == [list(i.getdata()) for i in images[1]]


def test_publishing_under_a_prefix_keeps_only_that_model(tmp_path: Path) -> None:
    out, model = _published(tmp_path / "student", ModelIndex.of(PRETRAIN), prefix="student.")
    saved = load_file(out / DIFFUSERS_WEIGHTS_FILE)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_directory_that_does_not_describe_itself_is_refused(tmp_path: Path) -> None:
    out, _ = _published(tmp_path / "ckpt", ModelIndex.of(PRETRAIN))
    (out / MODEL_INDEX_FILE).unlink()
    with pytest.raises(ValueError, match=f"not a self-describing checkpoint: no {MODEL_INDEX_FILE}"):
        load_text_to_image(out, RUN, CPU, seed=0)
    (out / MODEL_INDEX_FILE).write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="unreadable model index: _class_name is 'FluxPipeline'"):
        ModelIndex.read(out)
    (out / MODEL_INDEX_FILE).write_text(json.dumps({"_class_name": "Krea2TextToImage", "autoencoder": {"kind": "?"},
                                                    "text_encoder": {}}))
    with pytest.raises(ValueError, match="unreadable model index: autoencoder.kind"):
        ModelIndex.read(out)


def test_pairs_refuse_two_checkpoints_of_different_models(tmp_path: Path) -> None:
    index = ModelIndex.of(PRETRAIN)
    policy, _ = _published(tmp_path / "policy", index)
    other = dataclasses.replace(index, text_encoder=dataclasses.replace(index.text_encoder, max_tokens=16))
    previous, _ = _published(tmp_path / "previous", other)
    with pytest.raises(ValueError, match="is another model than the policy"):
        load_pipes(policy, previous, PRETRAIN.run_config())
