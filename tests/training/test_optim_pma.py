"""WSD schedule, AdamW / Muon parameter grouping, and PMA checkpoint merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import Krea2DiT
from krea2_core.training.config import OptimizerConfig
from krea2_core.training.optim import build_optimizers, param_groups_report
from krea2_core.training.pma import average_state_dicts, merge_safetensors, pma_weights
from krea2_core.training.schedules import wsd_factor, wsd_scheduler

# --------------------------------------------------------------------------- WSD schedule


def _wsd(step: int, **overrides: float) -> float:
    kwargs = {"total_steps": 100, "warmup_steps": 10, "decay_fraction": 0.2} | overrides
    return wsd_factor(step, **kwargs)


def test_wsd_warms_up_holds_then_decays_to_the_minimum() -> None:
    assert _wsd(0) == pytest.approx(0.1) and _wsd(4) == pytest.approx(0.5) and _wsd(9) == 1.0
    assert all(_wsd(s) == 1.0 for s in range(9, 81))
    assert _wsd(90) == pytest.approx(0.5) and _wsd(99) == pytest.approx(0.05)
    assert _wsd(100) == 0.0 and _wsd(150) == 0.0
    curve = [_wsd(s) for s in range(101)]
    assert curve[10:] == sorted(curve[10:], reverse=True) and curve[:10] == sorted(curve[:10])
    assert _wsd(90, min_factor=0.1) == pytest.approx(0.55) and _wsd(100, min_factor=0.1) == pytest.approx(0.1)


def test_wsd_edge_cases() -> None:
    assert _wsd(0, warmup_steps=0) == 1.0
    assert [_wsd(s, decay_fraction=0.0) for s in (10, 99, 100)] == [1.0, 1.0, 1.0]
    # all-decay: the smaller of warmup and decay wins where they overlap
    assert _wsd(0, decay_fraction=1.0) == pytest.approx(0.1) and _wsd(50, decay_fraction=1.0) == pytest.approx(0.5)
    assert wsd_factor(0, total_steps=1, warmup_steps=0, decay_fraction=1.0) == 1.0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"total_steps": 0}, "total_steps must be >= 1"),
    ({"warmup_steps": 101}, "warmup_steps must be in"),
    ({"warmup_steps": -1}, "warmup_steps must be in"),
    ({"decay_fraction": 1.5}, "decay_fraction must be in"),
    ({"min_factor": -0.1}, "min_factor must be in"),
])
def test_wsd_rejects_bad_arguments(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _wsd(0, **overrides)
    with pytest.raises(ValueError, match=message):
        wsd_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                      **({"total_steps": 100, "warmup_steps": 10, "decay_fraction": 0.2} | overrides))
    with pytest.raises(ValueError, match="step must be >= 0"):
        _wsd(-1)


def test_wsd_scheduler_sets_each_steps_lr_and_resumes() -> None:
    def make() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
        return optimizer, wsd_scheduler(optimizer, total_steps=20, warmup_steps=4, decay_fraction=0.5)

    optimizer, scheduler = make()
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.0 * wsd_factor(s, total_steps=20, warmup_steps=4, decay_fraction=0.5) for s in range(20)]
    assert lrs == pytest.approx(expected)
    resumed_optimizer, resumed = make()
    state = scheduler.state_dict()
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == scheduler.get_last_lr() and resumed.last_epoch == 20


# --------------------------------------------------------------------------- optimizers


_TINY = {"in_channels": 16, "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 256, "timestep_embed_dim": 64, "text_hidden_dim": 64,
         "num_text_layers": 3, "text_num_attention_heads": 2, "text_num_key_value_heads": 2,
         "text_intermediate_size": 128, "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1}


@pytest.fixture(scope="module")
def krea2() -> nn.Module:
    """diffusers' Krea 2 transformer: the public architecture, whose parameter names our DiT shares."""
    from diffusers.models.transformers.transformer_krea2 import Krea2Transformer2DModel

    return Krea2Transformer2DModel(**_TINY, axes_dims_rope=(8, 12, 12))


def _sets(report: dict[str, list[str]]) -> dict[str, set[str]]:
    return {group: set(names) for group, names in report.items()}


def test_muon_takes_hidden_matrices_and_leaves_first_last_layers_norms_and_tables_to_adamw(krea2: nn.Module) -> None:
    report = param_groups_report(krea2, OptimizerConfig(kind="muon"))
    names = [name for group in report.values() for name in group]
    assert sorted(names) == sorted(n for n, _ in krea2.named_parameters()), "each parameter in exactly one group"
    muon = set(report["muon"])
    first_last = {"img_in.weight", "txt_in.linear_1.weight", "txt_in.linear_2.weight", "time_embed.linear_1.weight",
                  "time_embed.linear_2.weight", "time_mod_proj.weight", "final_layer.linear.weight",
                  "text_fusion.projector.weight"}
    assert first_last <= set(report["adamw_decay"]) and not first_last & muon
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.ff.down.weight",
            "text_fusion.layerwise_blocks.0.attn.to_gate.weight", "text_fusion.refiner_blocks.0.ff.up.weight"} <= muon
    assert all(name.startswith(("transformer_blocks.", "text_fusion.")) for name in muon)
    # zero-centred RMSNorm weights are decayed (report: Normalization); biases and modulation tables are not
    assert {"transformer_blocks.0.norm1.weight", "transformer_blocks.0.attn.norm_q.weight",
            "final_layer.norm.weight", "txt_in.norm.weight"} <= set(report["adamw_decay"])
    assert set(report["adamw_no_decay"]) == {n for n in names if n.endswith((".bias", "scale_shift_table"))}


def test_adamw_kind_has_no_muon_group_and_compile_wrapping_keeps_the_names(krea2: nn.Module) -> None:
    adamw = param_groups_report(krea2, OptimizerConfig(kind="adamw"))
    assert adamw["muon"] == [] and "transformer_blocks.0.attn.to_q.weight" in adamw["adamw_decay"]
    compiled = torch.compile(krea2)  # lazy: nothing compiles until it is called
    assert param_groups_report(compiled, OptimizerConfig(kind="muon")) == param_groups_report(
        krea2, OptimizerConfig(kind="muon"))


def test_our_dit_is_grouped_like_diffusers_and_its_ablation_inputs_stay_on_adamw(krea2: nn.Module) -> None:
    muon = OptimizerConfig(kind="muon")
    assert _sets(param_groups_report(Krea2DiT(DiTConfig(**_TINY)), muon)) == _sets(param_groups_report(krea2, muon))
    ablation = param_groups_report(Krea2DiT(DiTConfig(**_TINY, time_tokens=2, modulation="adaln_mlp")), muon)
    assert "time_tokens_in.weight" in ablation["adamw_decay"] and "transformer_blocks.0.adaLN.weight" in ablation["muon"]


def test_optimizers_carry_the_configured_settings(krea2: nn.Module) -> None:
    config = OptimizerConfig(kind="muon", betas=[0.9, 0.99], weight_decay=0.1, muon_momentum=0.9)
    muon, adamw = build_optimizers(krea2, config, lr=3e-4)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    (group,) = muon.param_groups
    assert (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"], group["adjust_lr_fn"]) == (
        3e-4, 0.1, 0.9, True, "match_rms_adamw")
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert adamw.defaults["betas"] == (0.9, 0.99) and adamw.defaults["fused"] is True  # fused on CPU and CUDA
    (only,) = build_optimizers(krea2, OptimizerConfig(kind="adamw"), lr=1e-3)
    assert isinstance(only, torch.optim.AdamW)


def test_bad_optimizer_input_is_rejected(krea2: nn.Module) -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        build_optimizers(krea2, OptimizerConfig(), lr=0.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizers(frozen, OptimizerConfig(), lr=1e-3)


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16, generator=g)
    return model, x, torch.sin(x[:, :8] * 2) + x[:, 8:] ** 2


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_few_steps_reduce_a_loss(kind: str) -> None:
    model, x, y = _regression()
    optimizers = build_optimizers(model, OptimizerConfig(kind=kind, weight_decay=0.01), lr=3e-2)
    assert len(optimizers) == (2 if kind == "muon" else 1)
    losses = []
    for _ in range(30):
        loss = (model(x) - y).square().mean()
        losses.append(loss.item())
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_weight_decay_shrinks_decayed_parameters_only(kind: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(2, 2, 3), nn.Linear(4, 4))  # only parameters matter here
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = build_optimizers(model, OptimizerConfig(kind=kind, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only decoupled decay can move a parameter
    for optimizer in optimizers:
        optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name.endswith("weight") else before[name]
        torch.testing.assert_close(p.detach(), expected)


_DISTRIBUTED_SCRIPT = r"""
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import Krea2DiT
from krea2_core.training.config import OptimizerConfig
from krea2_core.training.optim import build_optimizers

def flat(model):
    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p.detach()).flatten() for p in model.parameters()])

def update(shard):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 33), nn.SiLU(), nn.Linear(33, 10))
    if shard:
        fully_shard(model)
    before = flat(model)
    optimizers = build_optimizers(model, OptimizerConfig(kind="muon", weight_decay=0.1), lr=0.02)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 10, generator=g)
    for _ in range(2):
        (model(x) - y).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return flat(model) - before

dist.init_process_group("gloo")
# A sharded matrix must get the update of the full matrix. Measured relative error: 0.02-0.03 (bf16 Newton-Schulz
# rounding along another path); orthogonalising each rank's row shard on its own instead gives 0.38.
reference = update(False)
error = ((update(True) - reference).norm() / reference.norm()).item()
assert error < 0.1, error
print("RELATIVE_ERROR", error)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_muon_on_fsdp2_sharded_parameters_matches_one_process(tmp_path: Path) -> None:
    script = tmp_path / "muon_fsdp.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "RELATIVE_ERROR" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------- PMA merging


def test_pma_weights() -> None:
    assert pma_weights(4) == [0.25] * 4
    ema = pma_weights(4, "ema", alpha=0.5)
    assert sum(ema) == pytest.approx(1.0) and [b / a for a, b in zip(ema[:-1], ema[1:], strict=True)] == pytest.approx([2.0] * 3)
    assert pma_weights(3, "wma") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    for args, message in [((0,), "k must be >= 1"), ((2, "ema", 0.0), "alpha must be in"),
                          ((2, "median"), "method must be")]:
        with pytest.raises(ValueError, match=message):
            pma_weights(*args)


def _checkpoints() -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((2, 3), float(i)), "b": torch.tensor([256.0, 1.0, 1.0, 1.0][i]).bfloat16().reshape(1),
             "count": torch.tensor([7])} for i in range(4)]


def test_merge_averages_in_float32_and_keeps_each_dtype() -> None:
    merged = average_state_dicts(_checkpoints())
    torch.testing.assert_close(merged["w"], torch.full((2, 3), 1.5))
    assert merged["b"].dtype == torch.bfloat16 and merged["count"].dtype == torch.int64
    # 256 + 1 + 1 + 1 summed in bf16 loses every 1 (spacing 2 at 256); float32 keeps them
    assert merged["b"].item() == torch.tensor(259 / 4).bfloat16().item() != 64.0
    assert torch.equal(merged["count"], torch.tensor([7]))
    weighted = average_state_dicts(_checkpoints(), weights=[0, 0, 1, 3])
    torch.testing.assert_close(weighted["w"], torch.full((2, 3), 2.75))


def test_merge_rejects_mismatches_naming_the_key() -> None:
    bad_shape = _checkpoints()
    bad_shape[2]["w"] = torch.zeros(3, 2)
    bad_keys = _checkpoints()
    bad_keys[1]["extra"] = bad_keys[1].pop("w")
    bad_ints = _checkpoints()
    bad_ints[3]["count"] = torch.tensor([8])
    for checkpoints, message in [(bad_shape, "'w' differs"), (bad_keys, r"state dict 1 .*missing \['w'\]"),
                                 (bad_ints, "'count' is a torch.int64 tensor whose values differ")]:
        with pytest.raises(ValueError, match=message):
            average_state_dicts(checkpoints)
    with pytest.raises(ValueError, match="weights must be 4 non-negative"):
        average_state_dicts(_checkpoints(), weights=[1, 1])
    with pytest.raises(ValueError, match="no checkpoints"):
        average_state_dicts([])


def test_merge_safetensors_streams_files_to_the_same_result(tmp_path: Path) -> None:
    checkpoints = [sd | {"head.proj": torch.ones(2)} for sd in _checkpoints()]
    paths = []
    for i, state in enumerate(checkpoints):
        paths.append(tmp_path / f"step{i}.safetensors")
        save_file(state, str(paths[-1]), metadata={"step": str(i)})
    out = merge_safetensors(paths, tmp_path / "merged" / "model.safetensors", weights=[1, 2, 3, 4],
                            drop_prefix="head.")
    expected = average_state_dicts(_checkpoints(), weights=[1, 2, 3, 4])
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for key in expected:
            assert torch.equal(f.get_tensor(key), expected[key])
        metadata = f.metadata()
    assert metadata["step"] == "3" and json.loads(metadata["pma_sources"]) == [p.name for p in paths]
    assert json.loads(metadata["pma_weights"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]


def test_merge_safetensors_names_the_file_with_other_keys(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"two.safetensors has different keys .* missing \['a'\], extra \['b'\]"):
        merge_safetensors([tmp_path / "one.safetensors", tmp_path / "two.safetensors"], tmp_path / "out.safetensors")
