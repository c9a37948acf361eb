"""torchrun worker for test_parallel.py: ``_parallel_worker.py MODE OUTDIR`` with MODE one of ``MODES``.

Every rank builds the same seeded tiny Krea2DiT and batch, runs one training step per case through ``parallelize``
(each data-parallel replica on its share of the batch), and rank 0 saves OUTDIR/<case>.pt: the global loss, the full
(unsharded) grads before clipping, every rank's clip_grad_norm result and the full params after one AdamW step. The
test runs the same step in one process with the helpers below and compares.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import Krea2DiT, position_ids
from krea2_core.training.config import TrainParallelConfig
from krea2_core.training.parallel import (
    DistEnv,
    apply_tensor_parallel,
    build_mesh,
    clip_grad_norm,
    data_parallel_rank,
    destroy_distributed,
    init_distributed,
    parallelize,
)

# hidden 128 = 4 heads x 32 (2 kv heads), every block linear divisible by 16
TINY = DiTConfig(in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, timestep_embed_dim=64, text_hidden_dim=64, num_text_layers=3,
                 text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=128)
# the block ablations that remove or add submodules: no output gate, GeLU MLP (no ff.gate), per-block adaLN, MHA
ABLATIONS = dataclasses.replace(TINY, attention="mha", attn_gate=False, mlp="gelu", modulation="adaln_mlp")
MODELS = {"tiny": TINY, "ablations": ABLATIONS}
BATCH, TEXT_LEN, GRID = 4, 5, 4
LR, MAX_NORM = 1e-3, 0.05  # MAX_NORM well under the tiny model's grad norm: clipping always acts

# case -> (TrainParallelConfig fields besides the world size, float8 recipe, MODELS key)
Case = tuple[dict, str, str]
MODES: dict[str, dict[str, Case]] = {
    "fast": {  # 2 ranks
        "fsdp": ({}, "none", "tiny"),
        "fsdp_selective": ({"activation_checkpointing": "selective"}, "none", "tiny"),
        "fsdp_full": ({"activation_checkpointing": "full"}, "none", "tiny"),
        "fsdp_bf16": ({"dtype": "bfloat16"}, "none", "tiny"),
        "fsdp_float8": ({}, "rowwise", "tiny"),
        "tp": ({"tp": 2, "fsdp": False}, "none", "tiny"),
        "tp_fsdp_selective": ({"tp": 2, "activation_checkpointing": "selective"}, "none", "tiny"),
        "tp_ablations": ({"tp": 2}, "none", "ablations"),
        "tp_float8": ({"tp": 2}, "tensorwise", "tiny"),
    },
    "2d": {"fsdp_tp": ({"tp": 2, "activation_checkpointing": "full"}, "none", "tiny")},  # 4 ranks: dp=2 x tp=2
    "compile": {  # 2 ranks
        "compile_fsdp": ({"compile": True, "activation_checkpointing": "selective"}, "none", "tiny"),
        "compile_tp": ({"compile": True, "tp": 2}, "none", "tiny"),
    },
}


def make_model(config: DiTConfig = TINY) -> Krea2DiT:
    """Seeded, with every parameter perturbed: the adaLN-zero init would leave most grads exactly zero."""
    torch.manual_seed(0)
    model = Krea2DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    mask[0, -2:] = False  # padded text on one sample
    return {
        "hidden_states": torch.randn(BATCH, GRID * GRID, TINY.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, TINY.num_text_layers, TINY.text_hidden_dim, generator=g),
        "timestep": torch.rand(BATCH, generator=g),
        "position_ids": position_ids(TEXT_LEN, GRID, GRID),
        "encoder_attention_mask": mask,
        "target": torch.randn(BATCH, GRID * GRID, TINY.in_channels, generator=g),
    }


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "target"}
    for k in ("hidden_states", "encoder_hidden_states"):  # the timestep stays float32
        inputs[k] = inputs[k].to(dtype)
    return F.mse_loss(model(**inputs).float(), batch["target"])


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """Loss, grads before clipping, grad norm, params after clipping and one AdamW step (collective if sharded)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loss = loss_fn(model, batch, dtype)
    loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    norm = clip_grad_norm(model, MAX_NORM)
    optimizer.step()
    return {"loss": loss.detach(), "grads": grads, "norm": norm,
            "params": {n: _full(p) for n, p in model.named_parameters()}}


def _run_case(env: DistEnv, outdir: Path, name: str, case: Case) -> None:
    fields, float8, model = case
    config = TrainParallelConfig(nproc_per_node=env.world_size, **fields)
    dp_index, dp_size = data_parallel_rank(env, config.tp)
    per = BATCH // dp_size
    batch = {k: v if k == "position_ids" else v[dp_index * per:(dp_index + 1) * per] for k, v in make_batch().items()}
    model = parallelize(make_model(MODELS[model]), config, env, float8)
    result = train_step(model, batch, getattr(torch, config.dtype))
    dist.all_reduce(result["loss"])  # gloo has no AVG
    result["loss"] = result["loss"].item() / env.world_size
    result["norms"] = [None] * env.world_size
    dist.all_gather_object(result["norms"], result.pop("norm"))
    if env.rank == 0:
        torch.save(result, outdir / f"{name}.pt")


def _errors(env: DistEnv, outdir: Path) -> None:
    """The ValueError messages of the bad tensor-parallel / data-parallel setups (None where nothing was raised)."""
    mesh = build_mesh(env, 2)
    setups = {
        "heads": lambda: apply_tensor_parallel(make_model(dataclasses.replace(TINY, num_attention_heads=3,
                                                                             num_key_value_heads=1)), mesh["tp"]),
        "kv_heads": lambda: apply_tensor_parallel(make_model(dataclasses.replace(TINY, num_key_value_heads=1)),
                                                  mesh["tp"]),
        "fsdp_off": lambda: parallelize(make_model(), TrainParallelConfig(fsdp=False), env, "none"),
    }
    errors = {}
    for name, setup in setups.items():
        try:
            setup()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    layout = [None] * env.world_size  # (data_parallel_rank, the mesh's own coordinates) per rank
    dist.all_gather_object(layout, (data_parallel_rank(env, 2), (mesh["dp"].get_local_rank(), mesh.size(0))))
    if env.rank == 0:
        torch.save({"errors": errors, "layout": layout}, outdir / "errors.pt")


def main(mode: str, outdir: Path) -> None:
    env = init_distributed("cpu")
    for name, case in MODES[mode].items():
        _run_case(env, outdir, name, case)
    if mode == "fast":
        _errors(env, outdir)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
