"""Spread one DiT training step over torchrun processes: a ("dp", "tp") device mesh, float8 linears (torchao),
tensor-parallel transformer blocks (DTensor), activation checkpointing, regional torch.compile and FSDP2, applied
in that order by ``parallelize``. Single process, each of these is a no-op except float8, AC and compile."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from krea2_core.training.config import TrainParallelConfig

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
AC_MODES = ("none", "selective", "full")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str) -> DistEnv:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo on
    cpu, nccl (plus gloo for cpu tensors) on cuda. Without that environment: rank 0 of 1, no process group."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, 0, torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", rank=rank,
                                world_size=world_size, device_id=dev if device == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_tp(world_size: int, tp: int) -> None:
    if tp < 1 or world_size % tp:
        raise ValueError(f"tp ({tp}) must be >= 1 and divide the world size ({world_size})")


def build_mesh(env: DistEnv, tp: int) -> DeviceMesh | None:
    """A (world_size // tp, tp) mesh named ("dp", "tp"): ranks r*tp .. r*tp+tp-1 form data-parallel replica r."""
    _check_tp(env.world_size, tp)
    if env.world_size == 1:
        return None
    return init_device_mesh(env.device.type, (env.world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def data_parallel_rank(env: DistEnv, tp: int) -> tuple[int, int]:
    """(this rank's data-parallel index, number of data-parallel replicas) under ``build_mesh``'s layout: the ranks
    of one tensor-parallel group must read the same batch."""
    _check_tp(env.world_size, tp)
    return env.rank // tp, env.world_size // tp


def _float8_eligible(module: nn.Module, fqn: str) -> bool:
    # Only the blocks' attention and MLP matmuls carry the FLOPs; the embedders, text fusion and final layer stay in
    # high precision. CPU kernels accept any shape, CUDA's need dims divisible by 16, so filter for both.
    parts = fqn.split(".")
    return (type(module) is nn.Linear and len(parts) > 3 and parts[0] == "transformer_blocks"
            and parts[2] in ("attn", "ff") and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: nn.Module, recipe: str) -> list[str]:
    """Swap the transformer blocks' attention and MLP linears for torchao Float8Linear; returns the swapped names."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8 recipe must be one of {FLOAT8_RECIPES}, got {recipe!r}")
    if recipe == "none":
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # slow import: only when used
    from torchao.float8.float8_linear import Float8Linear

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=_float8_eligible)
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


# Per transformer block. The attention and MLP inputs become replicated DTensors once (attention is called as
# attn(x, rope, mask)), so that the backward sums the partial input grads of q/k/v/gate (and gate/up) before a single
# all-reduce instead of one all-reduce per linear. Projections into heads / the MLP width are column-sharded, the ones
# back to the hidden size row-sharded (one all-reduce each); Krea2DiT's attention infers the head count from the
# local q/k/v widths, so it runs unchanged on its share of heads. QK-norm weights see only the local heads: as
# SequenceParallel over the head dim (B, S, heads, head_dim) they are replicated DTensors whose partial grads DTensor
# all-reduces (as plain parameters their grads would be partial).
_TP_PLAN = {
    "attn": PrepareModuleInput(input_layouts=(Replicate(), None, None), desired_input_layouts=(Replicate(), None, None)),
    "attn.to_q": ColwiseParallel(),
    "attn.to_k": ColwiseParallel(),
    "attn.to_v": ColwiseParallel(),
    "attn.to_gate": ColwiseParallel(),
    "attn.norm_q": SequenceParallel(sequence_dim=2, use_local_output=True),
    "attn.norm_k": SequenceParallel(sequence_dim=2, use_local_output=True),
    "attn.to_out.0": RowwiseParallel(),
    "ff": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
    "ff.gate": ColwiseParallel(),
    "ff.up": ColwiseParallel(),
    "ff.down": RowwiseParallel(),
}


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard every transformer block's heads and MLP width over ``tp_mesh``; the rest of the model is replicated."""
    tp = tp_mesh.size()
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        heads, kv_heads = attn.to_q.out_features // attn.head_dim, attn.to_k.out_features // attn.head_dim
        width = block.ff.down.in_features
        if heads % tp or kv_heads % tp or width % tp:
            raise ValueError(f"tensor parallel: transformer_blocks.{i} has {heads} attention heads, {kv_heads} "
                             f"key/value heads and MLP width {width}; tp ({tp}) must divide all three")
        # Ablations drop some submodules (no output gate, GeLU MLP): shard the ones this block has.
        parallelize_module(block, tp_mesh, {name: style for name, style in _TP_PLAN.items()
                                            if _has_submodule(block, name)})


_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmul
    torch.ops.aten.max.default,  # float8 amax: a full pass over the tensor for a scalar result
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.all_reduce.default,  # tensor-parallel all-reduces: never communicate twice
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """full: each transformer block keeps only its inputs and recomputes its forward in backward; selective: keeps
    matmul, attention and collective outputs too and recomputes only the cheap elementwise ops.
    The block's ``forward`` is wrapped in place (no wrapper module), so parameter and state-dict names stay the same."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls_and_attention)} \
        if mode == "selective" else {}
    for block in model.transformer_blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """Regional compilation: one compiled forward per transformer block (all blocks share it, so one compile); FSDP's
    hooks on the block module stay outside the compiled region."""
    for block in model.transformer_blocks:
        block.forward = torch.compile(block.forward, fullgraph=True)


# training-only heads attached to the model and called by the trainer on its outputs (iREPA's projector)
_HEADS_CALLED_OUTSIDE_FORWARD = ("repa_projector",)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, dtype: str) -> None:
    """FSDP2 over ``dp_mesh``: each text-fusion block, each transformer block, then the root (the embedders and final
    layer). bfloat16 computes with bf16 copies of the fp32 master weights and reduces grads in fp32; module inputs
    are not cast (the timestep and RoPE tables must stay float32), so pass the latents and text states in bf16."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    blocks = [*model.text_fusion.layerwise_blocks, *model.text_fusion.refiner_blocks, *model.transformer_blocks]
    for block in blocks:
        # The last block's parameters are needed again right at the start of backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=block is not blocks[-1])
    for head in _HEADS_CALLED_OUTSIDE_FORWARD:
        if hasattr(model, head):  # its own fp32 unit: gathered when it is called, its grads reduced in its backward
            fully_shard(getattr(model, head), mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: nn.Module, config: TrainParallelConfig, env: DistEnv, float8: str) -> nn.Module:
    """float8 -> tensor parallel -> activation checkpointing -> compile -> FSDP2 (the order each needs: TP shards the
    float8 linears, AC and compile wrap the sharded block, FSDP shards what is left). Returns ``model`` (changed in
    place); build the optimizer after this. Put the model on ``env.device`` first."""
    mesh = build_mesh(env, config.tp)
    apply_float8(model, float8)
    if config.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, config.activation_checkpointing)
    if config.compile:
        apply_compile(model)
    if mesh is not None:
        if config.fsdp:
            apply_fsdp(model, mesh["dp"], config.dtype)
        elif mesh["dp"].size() > 1:
            raise ValueError(f"fsdp=False with {mesh['dp'].size()} data-parallel ranks would leave their gradients "
                             "unsynchronised: FSDP2 is the data parallelism here, set fsdp=True (or tp=world size)")
    return model


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Scale all grads so their global L2 norm is at most ``max_norm``; returns the norm before clipping, the same
    float on every rank (inf/nan when a grad is not finite; then nothing is scaled)."""
    # torch's clip_grad_norm_ fails under tensor parallelism: it mixes plain and DTensor grads (TP alone) or stacks
    # norms from different meshes (TP grads on the 2-D mesh, the others on the dp mesh under FSDP). Reduce each
    # (mesh, placements) group on its own instead: one all-reduce per group.
    groups: dict[object, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    if math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def global_means(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-rank means (each rank holds the mean of its equal slice of the global batch) averaged over all ranks,
    in one all-reduce on the stats' device."""
    values = torch.stack([v.detach().float() for v in stats.values()])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(stats, values.tolist(), strict=True))
