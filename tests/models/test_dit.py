"""Krea2DiT against diffusers' Krea2Transformer2DModel (same weights, same outputs and gradients), the ablation
switches, the helpers and bad input."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import Krea2Transformer2DModel
from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

from krea2_core.common.strict import ConfigError
from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import (
    Krea2DiT,
    modulation_parameter_report,
    patchify,
    position_ids,
    unpatchify,
)

TINY = dict(in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, timestep_embed_dim=64, text_hidden_dim=64, num_text_layers=3,
            text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=128,
            num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(8, 12, 12))
TEXT, GRID_H, GRID_W, BATCH = 5, 3, 4, 2


def tiny_config(**switches: object) -> DiTConfig:
    return DiTConfig(**{**TINY, "axes_dims_rope": list(TINY["axes_dims_rope"]), **switches})


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter, zero-initialised tables and norm weights included, so nothing is trivially 0."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def inputs(seed: int = 1, mask: bool = False) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    text_mask = None
    if mask:  # ragged: 3 and 5 valid text tokens
        text_mask = torch.ones(BATCH, TEXT, dtype=torch.bool)
        text_mask[0, 3:] = False
    return dict(
        hidden_states=torch.randn(BATCH, GRID_H * GRID_W, TINY["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(BATCH, TEXT, TINY["num_text_layers"], TINY["text_hidden_dim"],
                                          generator=generator),
        timestep=torch.rand(BATCH, generator=generator),
        position_ids=position_ids(TEXT, GRID_H, GRID_W),
        encoder_attention_mask=text_mask,
    )


@pytest.fixture(scope="module")
def pair() -> tuple[Krea2Transformer2DModel, Krea2DiT]:
    torch.manual_seed(0)
    reference = randomise(Krea2Transformer2DModel(**TINY))
    ours = Krea2DiT(tiny_config())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("mask", [False, True], ids=["no_mask", "padding_mask"])
def test_matches_diffusers_outputs_and_gradients(pair, mask: bool) -> None:
    reference, ours = pair
    x = inputs(mask=mask)
    grads = []
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        leaves = {k: v.clone().requires_grad_() for k, v in x.items() if k in ("hidden_states", "encoder_hidden_states")}
        out = model(**{**x, **leaves})
        out = out.sample if hasattr(out, "sample") else out
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters()},
                      {k: v.grad for k, v in leaves.items()}))
    (ref_out, ref_params, ref_inputs), (our_out, our_params, our_inputs) = grads
    assert ref_out.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(our_out, ref_out, atol=1e-5, rtol=1e-5)
    assert our_params.keys() == ref_params.keys()
    for name, grad in ref_params.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(our_params[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for name, grad in ref_inputs.items():
        torch.testing.assert_close(our_inputs[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_stays_close_to_float32(pair) -> None:
    reference, ours = pair
    x = inputs(mask=True)
    with torch.no_grad():
        exact = reference(**x).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16, reference_bf16 = ours(**x), reference(**x).sample
    assert ours_bf16.dtype == torch.bfloat16
    scale = exact.abs().max()
    assert (ours_bf16.float() - exact).abs().max() < 0.02 * scale
    assert (ours_bf16.float() - exact).abs().max() <= 1.5 * (reference_bf16.float() - exact).abs().max()


def test_padding_mask_hides_padded_text(pair) -> None:
    _, ours = pair
    x = inputs(mask=True)
    changed = x["encoder_hidden_states"].clone()
    changed[0, 3:] += 5.0  # only sample 0's padded tokens
    with torch.no_grad():
        torch.testing.assert_close(ours(**{**x, "encoder_hidden_states": changed}), ours(**x))
        assert not torch.allclose(ours(**{**x, "encoder_attention_mask": None}), ours(**x))


def test_fresh_model_predicts_zero_and_learns() -> None:
    torch.manual_seed(0)
    model = Krea2DiT(tiny_config())
    x = inputs()
    assert torch.count_nonzero(model(**x)) == 0
    target = torch.randn(BATCH, GRID_H * GRID_W, TINY["in_channels"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = (model(**x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the zero-initialised output and gates have opened, so the blocks receive gradient
    loss = (model(**x) - target).pow(2).mean()
    loss.backward()
    assert model.transformer_blocks[0].attn.to_q.weight.grad.abs().max() > 0


BLOCK = "transformer_blocks.{i}."
ABLATIONS = {  # switches, keys that are new or change shape ({i}: every block), keys removed
    "mha": (dict(attention="mha"), {BLOCK + "attn.to_k.weight": (128, 128), BLOCK + "attn.to_v.weight": (128, 128)},
            set()),
    "no_gate": (dict(attn_gate=False), {}, {BLOCK + "attn.to_gate.weight"}),
    "gelu": (dict(mlp="gelu"), {BLOCK + "ff.up.weight": (256, 128)}, {BLOCK + "ff.gate.weight"}),
    "adaln_mlp": (dict(modulation="adaln_mlp"), {BLOCK + "adaLN.weight": (768, 128), BLOCK + "adaLN.bias": (768,)},
                  {"time_mod_proj.weight", "time_mod_proj.bias", BLOCK + "scale_shift_table"}),
    "time_tokens": (dict(time_tokens=4), {"time_tokens_in.weight": (512, 128), "time_tokens_in.bias": (512,)},
                    set()),
    "rope_2axis": (dict(rope="2axis"), {}, set()),
    "rope_none": (dict(rope="none"), {}, set()),
}


def every_block(keys):
    return {key.format(i=i) for key in keys for i in range(TINY["num_layers"])}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_builds_trains_and_changes_state_dict(pair, name: str) -> None:
    switches, shapes, removed = ABLATIONS[name]
    shapes = {key: shape for template, shape in shapes.items() for key in every_block([template])}
    removed = every_block(removed)
    base = pair[1].state_dict()
    model = randomise(Krea2DiT(tiny_config(**switches)))
    state = model.state_dict()
    assert removed <= base.keys()
    assert state.keys() == (base.keys() - removed) | shapes.keys()
    assert all(tuple(state[k].shape) == shape for k, shape in shapes.items())
    assert all(state[k].shape == base[k].shape for k in state.keys() - shapes.keys())
    x = inputs(mask=True)
    out = model(**x)
    assert out.shape == x["hidden_states"].shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_ablations_the_text_fusion_keeps_krea2_design() -> None:
    state = Krea2DiT(tiny_config(attn_gate=False, mlp="gelu", attention="mha")).state_dict()
    assert "text_fusion.refiner_blocks.0.attn.to_gate.weight" in state
    assert "text_fusion.refiner_blocks.0.ff.gate.weight" in state


def test_rope_variants_use_the_right_axes(pair) -> None:
    weights = pair[1].state_dict()
    x = inputs()
    frame_moved = {**x, "position_ids": x["position_ids"] + torch.tensor([7, 0, 0])}
    shuffled = {**x, "position_ids": x["position_ids"].flip(0)}
    outputs = {}
    with torch.no_grad():
        for rope in ("3axis", "2axis", "none"):
            model = Krea2DiT(tiny_config(rope=rope))
            model.load_state_dict(weights)
            outputs[rope] = (model(**x), model(**frame_moved), model(**shuffled))
    three, two, none = outputs["3axis"], outputs["2axis"], outputs["none"]
    assert not torch.allclose(three[0], three[1])  # 3axis rotates by the frame index
    torch.testing.assert_close(two[0], two[1])  # 2axis ignores it ...
    assert not torch.allclose(two[0], two[2]) and not torch.allclose(two[0], three[0])  # ... but not h, w
    torch.testing.assert_close(none[0], none[2])  # no positions at all
    torch.testing.assert_close(none[0], none[1])


@pytest.mark.parametrize("time_tokens", [0, 3])
def test_return_block_gives_image_tokens_after_that_block(time_tokens: int) -> None:
    model = randomise(Krea2DiT(tiny_config(time_tokens=time_tokens)))
    x = inputs(mask=True)
    seen = []
    model.transformer_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        velocity, features = model(**x, return_block=1)
        torch.testing.assert_close(velocity, model(**x))
    assert features.shape == (BATCH, GRID_H * GRID_W, model.config.hidden_size)
    torch.testing.assert_close(features, seen[0][:, time_tokens + TEXT:])
    assert not torch.allclose(features, seen[0][:, -GRID_H * GRID_W - 1:-1])


def test_patchify_round_trip_and_diffusers_packing() -> None:
    latents = torch.randn(2, 4, 6, 8)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 12, 16)
    packed = Krea2Pipeline._pack_latents(SimpleNamespace(patch_size=2), latents, 2, 4, 6, 8)
    torch.testing.assert_close(tokens, packed, atol=0, rtol=0)
    torch.testing.assert_close(unpatchify(tokens, 2, 6, 8, 4), latents, atol=0, rtol=0)
    torch.testing.assert_close(unpatchify(patchify(latents, 1), 1, 6, 8, 4), latents, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        patchify(latents, 4)
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(tokens, 2, 6, 6, 4)


def test_position_ids_match_diffusers_pipeline() -> None:
    ours = position_ids(5, 3, 4)
    assert ours.dtype == torch.long and ours.shape == (17, 3)
    torch.testing.assert_close(ours.float(), Krea2Pipeline.prepare_position_ids(5, 3, 4, "cpu"))
    assert ours[:5].count_nonzero() == 0 and ours[5 + 4].tolist() == [0, 1, 0]


@pytest.mark.parametrize("build, message", [
    (lambda: tiny_config(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value"),
    (lambda: tiny_config(axes_dims_rope=[8, 8, 8]), "axes_dims_rope must be 3 even sizes summing to"),
    (lambda: Krea2DiT(tiny_config(text_num_key_value_heads=3, text_num_attention_heads=4)),
     r"text_num_attention_heads \(4\) must be a multiple of text_num_key_value_heads \(3\)"),
    (lambda: Krea2DiT(tiny_config(timestep_embed_dim=63)), "timestep_embed_dim must be even"),
    (lambda: Krea2DiT(tiny_config(attention_head_dim=30, axes_dims_rope=[10, 10, 10], rope="2axis")),
     "attention_head_dim must be a multiple of 4"),
])
def test_bad_config_raises_config_error(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_bad_forward_input_raises(pair) -> None:
    ours = pair[1]
    x = inputs()
    with pytest.raises(ValueError, match=r"position_ids must have shape \(text_seq \+ image_seq, 3\) = \(17, 3\)"):
        ours(**{**x, "position_ids": position_ids(TEXT, GRID_H, GRID_W + 1)})
    with pytest.raises(ValueError, match=r"return_block must be in \[1, 2\], got 3"):
        ours(**x, return_block=3)


def diffusers_defaults() -> dict[str, object]:
    signature = inspect.signature(Krea2Transformer2DModel.__init__)
    return {name: p.default for name, p in signature.parameters.items() if name != "self"}


@pytest.mark.parametrize("size", ["tiny", "krea2_full"])
def test_modulation_parameter_report(size: str) -> None:
    kwargs = TINY if size == "tiny" else diffusers_defaults()
    config = DiTConfig(**{**kwargs, "axes_dims_rope": list(kwargs["axes_dims_rope"])})
    report = modulation_parameter_report(config)
    with torch.device("meta"):
        reference = Krea2Transformer2DModel(**kwargs)
    assert report["shared_bias_total"] == sum(p.numel() for p in reference.parameters())
    hidden, layers = config.hidden_size, config.num_layers
    assert report["shared_bias_modulation"] == hidden * 6 * hidden + 6 * hidden + layers * 6 * hidden
    assert report["adaln_mlp_modulation"] == layers * (hidden * 6 * hidden + 6 * hidden)
    assert report["shared_bias_total"] < report["adaln_mlp_total"]
    assert report["saving"] == report["adaln_mlp_total"] - report["shared_bias_total"]
    assert report["saving"] == report["adaln_mlp_modulation"] - report["shared_bias_modulation"]
    assert 0 < report["shared_bias_modulation_fraction"] < report["adaln_mlp_modulation_fraction"] < 1


@pytest.mark.slow
def test_compiled_model_matches_eager(pair) -> None:
    ours = pair[1]
    x = inputs(mask=True)
    compiled = torch.compile(ours, fullgraph=True)
    out = compiled(**x)
    out.square().mean().backward()
    torch.testing.assert_close(out, ours(**x), atol=1e-4, rtol=1e-4)  # inductor reorders float32 reductions
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
