"""Training-step throughput of Krea2DiT against diffusers' Krea2Transformer2DModel of the same config.

One step = forward + flow-matching MSE + backward + AdamW step, on the same inputs (a ragged text padding mask:
Krea 2 always attends with one) and the same weights (diffusers' random init, loaded into ours). Both models
live in the same process; each repeat times ``--steps`` steps of each, alternating which goes first, after
``--warmup`` untimed steps; the median step time over repeats is reported, with ours / diffusers as a ratio.
Before timing, the two outputs are checked to agree (a broken model would not be measured).

CPU (default): the tiny preset model (``DiTConfig()``, 8.5 M params) at 64 and 256 image tokens + 64 text
tokens, batch 8, standing in for 256/512 px; fp32 and bf16 autocast; ``--threads`` torch threads (1 by default,
like the other benchmarks). Both wall and process CPU time are recorded: on a shared machine CPU time is the
steadier one. Utilisation is against a matmul peak measured in the same run (a 2048^3 matmul, same dtype and
threads), not a spec sheet.

CUDA (``--device cuda``): the ``1b`` preset (1.17 B params, Krea 2 shape) at real 256/512 px token counts
(8x VAE, 2x2 patches: 256 and 1024 image tokens) + 128 text tokens; bf16 autocast, + torch.compile,
+ torchao float8 training (tensorwise; Linear layers with both dims divisible by 16). MFU is model FLOPs
(linear layers + attention, 3x forward) per second over the GPU's dense bf16 peak (``--peak-tflops``).
float8 is skipped, with the reason recorded, where the device cannot run it.

    python benchmarks/dit_training_step.py                  # CPU defaults, writes results/dit_training_step_cpu.json
    python benchmarks/dit_training_step.py --device cuda    # writes results/dit_training_step_cuda.json
"""

from __future__ import annotations

import _common  # noqa: I001 - must come first: pins threads before numpy is imported

import argparse
import dataclasses
import gc
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import Krea2Transformer2DModel
from torch import nn

from krea2_core.models.config import DiTConfig
from krea2_core.models.dit import Attention, Krea2DiT, position_ids

SIZES = {
    "tiny": DiTConfig(),
    "1b": DiTConfig(in_channels=64, num_layers=16, attention_head_dim=128, num_attention_heads=16,
                    num_key_value_heads=4, intermediate_size=5632, timestep_embed_dim=256, text_hidden_dim=2560,
                    num_text_layers=12, text_num_attention_heads=20, text_num_key_value_heads=20,
                    text_intermediate_size=6912, num_layerwise_text_blocks=2, num_refiner_text_blocks=2,
                    axes_dims_rope=[32, 48, 48]),
}
DIFFUSERS_ARGS = [f.name for f in dataclasses.fields(DiTConfig)  # DiTConfig's first fields are diffusers' arguments
                  if f.name in inspect.signature(Krea2Transformer2DModel.__init__).parameters]


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: torch.dtype = torch.float32  # autocast dtype; parameters stay float32
    compile: bool = False
    float8: bool = False


MODES = {m.name: m for m in (Mode("fp32"), Mode("bf16", torch.bfloat16), Mode("bf16+compile", torch.bfloat16, True),
                             Mode("bf16+compile+float8", torch.bfloat16, True, True))}
DEFAULTS = {  # device -> size, image tokens, text tokens, modes
    "cpu": ("tiny", "64,256", 64, "fp32,bf16"),
    "cuda": ("1b", "256,1024", 128, "bf16,bf16+compile,bf16+compile+float8"),
}
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build_pair(config: DiTConfig, device: str, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    kwargs = {name: getattr(config, name) for name in DIFFUSERS_ARGS}
    with torch.device(device):  # initialised where they run (the 1b preset would take minutes on the host)
        reference = Krea2Transformer2DModel(**{**kwargs, "axes_dims_rope": tuple(config.axes_dims_rope)})
        ours = Krea2DiT(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return {"ours": ours, "diffusers": reference}


def make_inputs(config: DiTConfig, batch: int, text: int, image: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    grid = int(image**0.5)
    if grid * grid != image:
        raise SystemExit(f"image token counts must be squares (a square latent grid), got {image}")
    valid = torch.randint(text // 4, text + 1, (batch,), generator=generator)
    tensors = dict(
        hidden_states=torch.randn(batch, image, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(batch, text, config.num_text_layers, config.text_hidden_dim,
                                          generator=generator),
        timestep=torch.rand(batch, generator=generator),
        position_ids=position_ids(text, grid, grid),
        encoder_attention_mask=torch.arange(text)[None, :] < valid[:, None],
        target=torch.randn(batch, image, config.in_channels, generator=generator),
    )
    return {k: v.to(device) for k, v in tensors.items()}


def velocity(model: Callable[..., object], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**{k: v for k, v in inputs.items() if k != "target"})
    return out.sample if hasattr(out, "sample") else out


def training_flops(model: Krea2DiT, inputs: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training step: 3x the forward's linear-layer and attention matmuls (hooks on one
    forward, so every ablation and sequence length is counted as it runs)."""
    total = 0.0

    def linear(module: nn.Linear, args: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * args[0].numel() * module.out_features

    def attention(_module: Attention, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal total
        x = args[0]  # (batch, seq, dim): q k^T and p v, each 2 * seq^2 * dim per sequence
        total += 4.0 * x.shape[0] * x.shape[1] ** 2 * x.shape[2]

    hooks = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(attention) for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        velocity(model, inputs)
    for hook in hooks:
        hook.remove()
    return 3.0 * total


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """torchao float8 needs both dims divisible by 16 (CPU accepts shapes CUDA rejects, so filter here)."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def float8_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "float8 training needs a CUDA GPU with float8 tensor cores (runs on CPU only as a slow emulation)"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"float8 needs compute capability >= 8.9, {torch.cuda.get_device_name()} has " \
               f"{torch.cuda.get_device_capability()}"
    return None


def prepare(model: nn.Module, mode: Mode) -> Callable[..., object]:
    if mode.float8:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=float8_filter)
    return torch.compile(model) if mode.compile else model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model: Callable[..., object], optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
               mode: Mode, device: str) -> None:
    with torch.autocast(device, dtype=mode.dtype, enabled=mode.dtype != torch.float32):
        loss = F.mse_loss(velocity(model, inputs).float(), inputs["target"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n^3 matmul: the roofline the CPU utilisation is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times[1:])


def measure(config: DiTConfig, mode: Mode, image: int, args: argparse.Namespace) -> list[dict[str, object]]:
    inputs = make_inputs(config, args.batch, args.text_tokens, image, args.device)
    models = build_pair(config, args.device, args.seed)
    with torch.no_grad():  # same weights, same inputs: a broken model is not worth timing
        ours, ref = velocity(models["ours"], inputs), velocity(models["diffusers"], inputs)
        torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-3)
    flops = training_flops(models["ours"], inputs)
    runners = {name: prepare(model, mode) for name, model in models.items()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
                  for name, model in models.items()}
    for name in runners:
        for _ in range(args.warmup):
            train_step(runners[name], optimizers[name], inputs, mode, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(runners)[::-1]
        for name in order:
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                train_step(runners[name], optimizers[name], inputs, mode, args.device)
            sync(args.device)
            wall[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    rows = []
    for name in runners:
        step_s, step_cpu_s = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append({
            "image_tokens": image, "mode": mode.name, "model": name,
            "step_ms": 1e3 * step_s, "step_cpu_ms": 1e3 * step_cpu_s,
            "step_ms_all": [round(1e3 * t, 2) for t in wall[name]],
            "images_per_s": args.batch / step_s, "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / step_s / 1e12,
            "speedup_vs_diffusers_wall": statistics.median(wall["diffusers"]) / step_s,
            "speedup_vs_diffusers_cpu": statistics.median(cpu["diffusers"]) / step_cpu_s,
        })
        if args.device == "cuda":
            rows[-1]["peak_memory_gib_both_models"] = torch.cuda.max_memory_allocated() / 2**30
    return rows


def gpu_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=list(DEFAULTS), default="cpu")
    parser.add_argument("--size", choices=list(SIZES), help="model preset (default: tiny on cpu, 1b on cuda)")
    parser.add_argument("--image-tokens", help="comma-separated square counts (default: 64,256 cpu; 256,1024 cuda)")
    parser.add_argument("--text-tokens", type=int, help="padded text length (default: 64 cpu, 128 cuda)")
    parser.add_argument("--modes", help=f"comma-separated of {','.join(MODES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (compile happens here)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak for MFU (default: by device name)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, image_tokens, text_tokens, modes = DEFAULTS[args.device]
    args.size = args.size or size
    args.text_tokens = args.text_tokens or text_tokens
    image_counts = [int(n) for n in (args.image_tokens or image_tokens).split(",")]
    mode_names = (args.modes or modes).split(",")
    if unknown := set(mode_names) - MODES.keys():
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    config = SIZES[args.size]

    peaks: dict[str, float | None] = {}
    rows, skipped = [], []
    for name in mode_names:
        mode = MODES[name]
        if mode.float8 and (reason := float8_unavailable(args.device)):
            skipped.append({"mode": name, "reason": reason})
            print(f"skipping {name}: {reason}")
            continue
        if args.device == "cuda":
            peak = gpu_peak_tflops(args.peak_tflops)
            peaks[name] = peak * 1e12 if peak else None
        else:
            peaks[name] = matmul_peak("cpu", mode.dtype)
        for image in image_counts:
            print(f"measuring {name} at {image} image tokens ...", flush=True)
            for row in measure(config, mode, image, args):
                peak = peaks[name]
                row["utilisation"] = row["achieved_tflops"] * 1e12 / peak if peak else None
                rows.append(row)
            torch._dynamo.reset()  # drop compiled graphs (and the models they hold) before the next pair
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()

    columns = {"image tokens": "image_tokens", "mode": "mode", "model": "model", "ms/step": "step_ms",
               "ms/step (CPU time)": "step_cpu_ms", "img/s": "images_per_s", "TFLOP/s": "achieved_tflops",
               "MFU" if args.device == "cuda" else "util vs matmul peak": "utilisation",
               "x diffusers": "speedup_vs_diffusers_wall", "x diffusers (CPU time)": "speedup_vs_diffusers_cpu"}
    if args.device == "cuda":  # host CPU time says nothing about GPU work
        columns = {k: v for k, v in columns.items() if "CPU time" not in k}
    table = [["" if r[key] is None else f"{r[key]:.1%}" if key == "utilisation" else r[key]
              for key in columns.values()] for r in rows]
    print(_common.markdown_table(list(columns), table))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Krea2DiT(config).parameters())
    path = _common.write_json(f"dit_training_step_{args.device}.json", {
        "benchmark": "dit_training_step",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else _common.cpu_model(),
        "settings": {"size": args.size, "config": dataclasses.asdict(config), "params": n_params,
                     "batch": args.batch, "text_tokens": args.text_tokens, "image_tokens": image_counts,
                     "modes": mode_names, "warmup": args.warmup, "repeats": args.repeats, "steps": args.steps,
                     "mask": "ragged text padding mask, valid lengths uniform in [text/4, text]",
                     "optimizer": "AdamW lr 1e-4 (fused on cuda)", "seed": args.seed},
        "peak_flops_per_s": peaks,
        "rows": rows,
        "skipped": skipped,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
