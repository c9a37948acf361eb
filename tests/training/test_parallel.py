"""Training parallelism on CPU. One torchrun run of 2 gloo processes (_parallel_worker.py, mode "fast") trains one
step per setup (FSDP2, FSDP2 + activation checkpointing, FSDP2 bf16, tensor parallel alone / over FSDP / on the
ablation blocks / with float8) and the tests compare each with the same step in this process. Float8, activation
checkpointing, clipping and bad input are checked in-process."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from krea2_core.training.config import TrainParallelConfig
from krea2_core.training.parallel import (
    DistEnv,
    apply_activation_checkpointing,
    apply_float8,
    apply_fsdp,
    build_mesh,
    clip_grad_norm,
    data_parallel_rank,
    init_distributed,
    parallelize,
)

from . import _parallel_worker as worker

CPU = torch.device("cpu")
FAST = worker.MODES["fast"]
BLOCK_LINEARS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down"]


def _torchrun(mode: str, nproc: int, outdir: Path) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           worker.__file__, mode, str(outdir)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return outdir


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _torchrun("fast", 2, tmp_path_factory.mktemp("parallel_fast"))


def _load(outdir: Path, name: str) -> dict:
    return torch.load(outdir / f"{name}.pt", weights_only=True)


@functools.cache
def _reference(float8: str = "none", model_name: str = "tiny") -> dict:
    """The same step in one process (float32, whole batch)."""
    model = worker.make_model(worker.MODELS[model_name])
    apply_float8(model, float8)
    result = worker.train_step(model, worker.make_batch())
    result["loss"] = result["loss"].item()
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _assert_step_matches(result: dict, ref: dict, grad_rtol: float = 1e-4, param_atol: float = 1e-5) -> None:
    assert result["grads"].keys() == ref["grads"].keys()
    bad = {n: _rel(result["grads"][n], g) for n, g in ref["grads"].items() if _rel(result["grads"][n], g) > grad_rtol}
    assert not bad, f"grads differ from the single-process step (max abs diff / max abs grad): {bad}"
    assert max((result["params"][n] - p).abs().max().item() for n, p in ref["params"].items()) < param_atol
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert len(set(result["norms"])) == 1, f"clip_grad_norm differs across ranks: {result['norms']}"
    assert result["norms"][0] == pytest.approx(ref["norm"], rel=1e-5)


def test_fsdp_step_matches_single_process(fast_run: Path) -> None:
    result, ref = _load(fast_run, "fsdp"), _reference()
    _assert_step_matches(result, ref)
    assert ref["norm"] > 10 * worker.MAX_NORM  # the step clipped: the updated params prove the scaling matched


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_grads_are_bit_identical_under_fsdp(fast_run: Path, mode: str) -> None:
    plain, checkpointed = _load(fast_run, "fsdp"), _load(fast_run, f"fsdp_{mode}")
    for name, grad in plain["grads"].items():
        assert torch.equal(checkpointed["grads"][name], grad), name
    assert checkpointed["norms"] == plain["norms"]


def test_fsdp_bfloat16_computes_in_bf16_close_to_float32(fast_run: Path) -> None:
    bf16, ref = _load(fast_run, "fsdp_bf16"), _reference()
    assert bf16["loss"] == pytest.approx(ref["loss"], rel=1e-2)
    assert bf16["loss"] != ref["loss"]  # bf16 compute really happened
    for name, grad in ref["grads"].items():
        assert F.cosine_similarity(bf16["grads"][name].flatten(), grad.flatten(), dim=0) > 0.99, name
    assert len(set(bf16["norms"])) == 1


def test_fsdp_float8_matches_single_process_float8(fast_run: Path) -> None:
    """Row-wise float8 scales the forward per token (the loss is the same however the batch is split) but the weight
    grads per column over the tokens, which each rank only sees half of: those round a little differently."""
    result, ref = _load(fast_run, "fsdp_float8"), _reference("rowwise")
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert max(_rel(result["grads"][n], g) for n, g in ref["grads"].items()) < 2e-2
    assert len(set(result["norms"])) == 1 and result["norms"][0] == pytest.approx(ref["norm"], rel=1e-3)


@pytest.mark.parametrize("case", ["tp", "tp_fsdp_selective", "tp_ablations", "tp_float8"])
def test_tensor_parallel_grads_match_single_process(fast_run: Path, case: str) -> None:
    """Every parameter, QK-norm weights included (their grads would be partial without the all-reduce)."""
    _, float8, model_name = FAST[case]
    result = _load(fast_run, case)
    assert {"transformer_blocks.1.attn.norm_q.weight", "transformer_blocks.1.attn.norm_k.weight"} <= result["grads"].keys()
    _assert_step_matches(result, _reference(float8, model_name))


def test_bad_parallel_setups_fail_clearly(fast_run: Path) -> None:
    found = torch.load(fast_run / "errors.pt", weights_only=True)
    errors = found["errors"]
    assert "3 attention heads" in errors["heads"] and "tp (2) must divide" in errors["heads"]
    assert "1 key/value heads" in errors["kv_heads"] and "tp (2) must divide" in errors["kv_heads"]
    assert "fsdp=False with 2 data-parallel ranks" in errors["fsdp_off"]
    for dp_rank, mesh_coordinate in found["layout"]:  # data_parallel_rank follows build_mesh's layout
        assert dp_rank == mesh_coordinate


def test_build_mesh_and_data_parallel_rank_reject_tp_not_dividing_world_size() -> None:
    with pytest.raises(ValueError, match=r"tp \(3\) must be >= 1 and divide the world size \(2\)"):
        build_mesh(DistEnv(0, 2, 0, CPU), 3)
    with pytest.raises(ValueError, match=r"tp \(2\) must be >= 1 and divide the world size \(1\)"):
        parallelize(worker.make_model(), TrainParallelConfig(nproc_per_node=2, tp=2), DistEnv(0, 1, 0, CPU), "none")
    assert build_mesh(DistEnv(0, 1, 0, CPU), 1) is None
    assert data_parallel_rank(DistEnv(5, 8, 1, CPU), 2) == (2, 4)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_swaps_only_block_attention_and_mlp_linears(recipe: str) -> None:
    model = worker.make_model()
    keys = model.state_dict().keys()
    swapped = apply_float8(model, recipe)
    assert swapped == [f"transformer_blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    kept = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in swapped]
    assert {"img_in", "final_layer.linear", "txt_in.linear_1", "time_mod_proj", "time_embed.linear_1",
            "text_fusion.layerwise_blocks.0.attn.to_q"} <= set(kept)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in kept)
    assert model.state_dict().keys() == keys
    loss = worker.loss_fn(model, worker.make_batch())
    loss.backward()
    assert loss.item() == pytest.approx(_reference()["loss"], rel=1e-2)
    assert all(p.grad is not None for p in model.parameters())


def test_float8_skips_block_linears_with_dims_not_divisible_by_16() -> None:
    model = worker.make_model(dataclasses.replace(worker.TINY, intermediate_size=200))
    swapped = apply_float8(model, "tensorwise")
    assert swapped == [f"transformer_blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS[:5]]
    with pytest.raises(ValueError, match="float8 recipe must be one of"):
        apply_float8(model, "mxfp8")


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str) -> Counter[str]:
    model = worker.make_model()
    apply_activation_checkpointing(model, mode)
    loss = worker.loss_fn(model, worker.make_batch())
    with _OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_activation_checkpointing_recomputes_what_its_mode_says() -> None:
    """full recomputes each block's matmuls and attention in backward; selective only its cheap elementwise ops."""
    none, selective, full = (_backward_ops(mode) for mode in ("none", "selective", "full"))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    linears_per_block = len(BLOCK_LINEARS)
    assert none[attention] == selective[attention] == 0 and full[attention] == 2
    assert selective["mm"] == none["mm"] and full["mm"] == none["mm"] + 2 * linears_per_block
    assert none["silu"] == 0 and selective["silu"] == full["silu"] == 2
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        apply_activation_checkpointing(worker.make_model(), "partial")


def test_parallelize_single_process_keeps_names_and_numerics() -> None:
    model = worker.make_model()
    keys = model.state_dict().keys()
    config = TrainParallelConfig(nproc_per_node=1, activation_checkpointing="full")
    assert parallelize(model, config, DistEnv(0, 1, 0, CPU), "none") is model
    assert model.state_dict().keys() == keys
    assert worker.loss_fn(model, worker.make_batch()).item() == _reference()["loss"]


def test_clip_grad_norm_matches_torch_and_returns_a_float() -> None:
    ours, theirs = worker.make_model(), worker.make_model()
    for model in (ours, theirs):
        worker.loss_fn(model, worker.make_batch()).backward()
    norm = clip_grad_norm(ours, 0.1)
    assert type(norm) is float
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1).item(), rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    before = [p.grad.clone() for p in ours.parameters()]
    assert clip_grad_norm(ours, 1e6) == pytest.approx(0.1, rel=1e-4)  # under max_norm: nothing scaled
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ours.parameters(), strict=True))


def test_init_distributed_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") == DistEnv(0, 1, 0, CPU)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        init_distributed("tpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        apply_fsdp(worker.make_model(), None, "float16")


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_2d_matches_single_process(tmp_path: Path) -> None:
    """4 ranks: FSDP2 over dp=2 of TP over tp=2 (grads on two meshes, clipped together), full AC."""
    _assert_step_matches(_load(_torchrun("2d", 4, tmp_path), "fsdp_tp"), _reference())


@pytest.mark.slow
def test_compiled_blocks_match_single_process(tmp_path: Path) -> None:
    """torch.compile per block under FSDP2 + selective AC and under TP (minutes: two cold compiles per rank)."""
    _torchrun("compile", 2, tmp_path)
    for case in worker.MODES["compile"]:
        _assert_step_matches(_load(tmp_path, case), _reference())
