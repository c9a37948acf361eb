"""The Krea 2 single-stream DiT, state-dict compatible with diffusers' ``Krea2Transformer2DModel`` (0.42).

Text and image tokens share one sequence. GQA attention with QK-norm and a sigmoid output gate, zero-centred
RMSNorm computed in float32, SwiGLU, one shared timestep projection plus a per-block learned table, text
features fused across tapped encoder layers then refined across tokens, 3-axis RoPE with text at index 0.

Written here instead of training diffusers' module for two reasons: the ablation switches of ``DiTConfig``, and
training speed (no per-call signature inspection or attention dispatch, GQA without copying k/v heads where the
kernel allows it, float32 attention on CPU, RoPE as one complex multiply, fused modulate/residual updates; see
benchmarks/dit_training_step.py). With the default config
``Krea2DiT(cfg).load_state_dict(diffusers_model.state_dict())`` is strict and the outputs match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2_core.common.strict import ConfigError
from krea2_core.models.config import DiTConfig

Rope = tuple[Tensor, Tensor]  # cos, sin: (seq, 1, head_dim / 2) float32


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm (multiplier ``1 + weight``), computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the +1 in float32: in bf16 a near-zero weight would round 1 + w to steps of 1/128
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float() + 1.0, self.eps).to(x.dtype)


def rope_frequencies(positions: Tensor, axes_dims: Sequence[int], theta: float) -> Rope:
    """Axial RoPE angles for ``positions`` (seq, n_axes): axis i rotates its own ``axes_dims[i]`` slice of the
    head dim. float32 throughout (diffusers goes through float64; the angles differ by ~1 ulp)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / -dim)
        angles.append(positions[:, axis, None].float() * freqs)
    angle = torch.cat(angles, dim=-1)[:, None]  # broadcast over heads
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of ``x`` (batch, seq, heads, head_dim) by ``rope``."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor has no complex codegen; it fuses the real form instead
        real, imag = pairs.unbind(-1)
        out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:  # eager: one complex multiply is ~5x faster (forward + backward) than the real form
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return out.flatten(-2).to(x.dtype)


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1.0 + scale)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA over (B, heads, S, head_dim) with grouped k/v heads, in the fastest form measured per device."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu":
        # The CPU flash kernel takes a mask with enable_gqa (no k/v copy), and is 1.3-2.5x faster (forward +
        # backward) in float32 than in bf16, so it runs in float32 even under bf16 autocast.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
        return out.to(q.dtype)
    if gqa and mask is not None:
        # CUDA: of the kernels taking a mask, only math and cuDNN also take enable_gqa; with expanded k/v the
        # memory-efficient kernel runs.
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    """Self-attention: grouped-query projections, per-head q/k RMSNorm, optional RoPE and sigmoid output gate."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, eps: float, gate: bool = True) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_gate = nn.Linear(dim, dim, bias=False) if gate else None
        self.norm_q = RMSNorm(self.head_dim, eps)
        self.norm_k = RMSNorm(self.head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # a list only for diffusers' key names

    def forward(self, x: Tensor, rope: Rope | None = None, mask: Tensor | None = None) -> Tensor:
        # heads as -1 so that a tensor-parallel shard (fewer local heads) runs unchanged
        q = self.norm_q(self.to_q(x).unflatten(-1, (-1, self.head_dim)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (-1, self.head_dim)))
        v = self.to_v(x).unflatten(-1, (-1, self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2).flatten(2)
        if self.to_gate is not None:
            out = out * torch.sigmoid(self.to_gate(x))
        return self.to_out[0](out)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """Ablation ``mlp="gelu"``: the classic DiT MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class TextFusionBlock(nn.Module):
    """Pre-norm block without RoPE or time modulation (Krea 2 design whatever the ablation switches)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, intermediate_size: int, eps: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.norm2 = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, eps)
        self.ff = SwiGLU(dim, intermediate_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class TextFusion(nn.Module):
    """Layerwise blocks attend across the tapped-layer axis of each token, ``projector`` mixes the layers into
    one, refiner blocks attend across the tokens."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()

        def block() -> TextFusionBlock:
            return TextFusionBlock(config.text_hidden_dim, config.text_num_attention_heads,
                                   config.text_num_key_value_heads, config.text_intermediate_size, config.norm_eps)

        self.layerwise_blocks = nn.ModuleList([block() for _ in range(config.num_layerwise_text_blocks)])
        self.projector = nn.Linear(config.num_text_layers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([block() for _ in range(config.num_refiner_text_blocks)])

    def forward(self, text: Tensor, mask: Tensor | None = None) -> Tensor:
        """text (B, T, layers, D) -> (B, T, D); mask (B, 1, 1, T) bool or None."""
        x = text.flatten(0, 1)
        for block in self.layerwise_blocks:
            x = block(x)
        x = (self.projector.weight @ x).squeeze(-2).unflatten(0, text.shape[:2])  # (1, L) @ (BT, L, D)
        for block in self.refiner_blocks:
            x = block(x, mask)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_kv_heads = config.num_attention_heads if config.attention == "mha" else config.num_key_value_heads
        if config.modulation == "shared_bias":
            self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden))
            self.adaLN = None
        else:
            self.register_parameter("scale_shift_table", None)
            self.adaLN = nn.Linear(hidden, 6 * hidden)
        self.norm1 = RMSNorm(hidden, config.norm_eps)
        self.norm2 = RMSNorm(hidden, config.norm_eps)
        self.attn = Attention(hidden, config.num_attention_heads, num_kv_heads, config.norm_eps, config.attn_gate)
        mlp = SwiGLU if config.mlp == "swiglu" else GeluMLP
        self.ff = mlp(hidden, config.intermediate_size)

    def forward(self, x: Tensor, time: Tensor, rope: Rope | None, mask: Tensor | None) -> Tensor:
        """time (B, 1, 6 * hidden): the shared projection (shared_bias) or the activated timestep embedding
        (adaln_mlp, which then has its own projection here)."""
        if self.adaLN is None:
            modulation = time.unflatten(-1, (6, -1)) + self.scale_shift_table
        else:
            modulation = self.adaLN(time).unflatten(-1, (6, -1))
        scale1, shift1, gate1, scale2, shift2, gate2 = modulation.unbind(-2)
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), scale1, shift1), rope, mask))
        return torch.addcmul(x, gate2, self.ff(modulate(self.norm2(x), scale2, shift2)))


class TimestepEmbedding(nn.Module):
    """Cos-first sinusoids of 1000 t, then a two-layer MLP; keeps a sequence axis of 1 to broadcast over tokens."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(embed_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> Tensor:
        half = self.linear_1.in_features // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        args = (timestep.float() * 1e3)[:, None, None] * freqs
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(dtype)
        return self.linear_2(F.gelu(self.linear_1(emb), approximate="tanh"))


class TextProjection(nn.Module):
    def __init__(self, text_dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(text_dim, eps)
        self.linear_1 = nn.Linear(text_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(x)), approximate="tanh"))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden))
        self.norm = RMSNorm(hidden, eps)
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = (temb + self.scale_shift_table).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), scale, shift))


def _check(config: DiTConfig) -> None:
    """Rules DiTConfig itself does not check (they only matter to the model)."""
    rules = [
        (config.text_num_attention_heads % config.text_num_key_value_heads == 0,
         f"text_num_attention_heads ({config.text_num_attention_heads}) must be a multiple of "
         f"text_num_key_value_heads ({config.text_num_key_value_heads})"),
        (config.timestep_embed_dim % 2 == 0, f"timestep_embed_dim must be even, got {config.timestep_embed_dim}"),
        (config.rope != "2axis" or config.attention_head_dim % 4 == 0,
         f"rope='2axis' splits the head dim in two even halves: attention_head_dim must be a multiple of 4, "
         f"got {config.attention_head_dim}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


class Krea2DiT(nn.Module):
    """The Krea 2 DiT; ``DiTConfig()``'s ablation switches at their defaults give diffusers' state dict.

    Ablations (main blocks only; the text fusion stays as in Krea 2): ``attention="mha"``, ``attn_gate=False``,
    ``mlp="gelu"`` (``ff.up``/``ff.down``), ``modulation="adaln_mlp"`` (per-block ``adaLN`` Linear on the activated
    timestep embedding, no ``time_mod_proj`` nor per-block tables), ``time_tokens=N`` (``time_tokens_in`` makes N
    tokens prepended to the sequence at RoPE index 0, dropped at the output; modulation stays), ``rope="2axis"``
    (no frame axis: h and w each rotate half the head dim; column 0 of position_ids is ignored), ``rope="none"``.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        _check(config)
        self.config = config
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_embed = TimestepEmbedding(config.timestep_embed_dim, hidden)
        self.time_mod_proj = nn.Linear(hidden, 6 * hidden) if config.modulation == "shared_bias" else None
        self.time_tokens_in = nn.Linear(hidden, config.time_tokens * hidden) if config.time_tokens else None
        self.text_fusion = TextFusion(config)
        self.txt_in = TextProjection(config.text_hidden_dim, hidden, config.norm_eps)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
        self.final_layer = FinalLayer(hidden, config.in_channels, config.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init for training from scratch. Xavier linears with zero biases; norms and tables at 0 (unit scale, no
        shift); timestep MLP normal(0.02) as in DiT; the time projection (shared or per-block adaLN) and the output
        projection at 0 (adaLN-Zero: every block starts as the identity and the untrained model predicts 0); the
        layer projector starts as the mean of the tapped layers. ``load_state_dict`` overrides all of it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight)
        for name, param in self.named_parameters():
            if name.endswith("scale_shift_table"):
                nn.init.zeros_(param)
        for linear in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        zero = [self.final_layer.linear, self.time_mod_proj, *(block.adaLN for block in self.transformer_blocks)]
        for linear in zero:
            if linear is not None:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        self.text_fusion.projector.weight.fill_(1.0 / self.config.num_text_layers)

    def rope(self, positions: Tensor) -> Rope | None:
        """RoPE for the whole sequence (time tokens, text, image) from the text + image ``positions``."""
        config = self.config
        if config.rope == "none":
            return None
        if config.time_tokens:
            positions = torch.cat([positions.new_zeros(config.time_tokens, positions.shape[1]), positions])
        if config.rope == "2axis":
            half = config.attention_head_dim // 2
            return rope_frequencies(positions[:, 1:], (half, half), config.rope_theta)
        return rope_frequencies(positions, config.axes_dims_rope, config.rope_theta)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        position_ids: Tensor,
        encoder_attention_mask: Tensor | None = None,
        *,
        return_block: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity (B, image_seq, in_channels) for packed latents ``hidden_states`` (B, image_seq, in_channels),
        tapped text states (B, text_seq, num_text_layers, text_hidden_dim), ``timestep`` (B,) in [0, 1] (1 =
        noise), ``position_ids`` (text_seq + image_seq, 3) and an optional (B, text_seq) bool mask of valid text
        tokens (each row needs at least one). ``return_block=k`` (1-based) also returns the image tokens after
        block k: ``(velocity, (B, image_seq, hidden))``."""
        batch, image_len, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        if tuple(position_ids.shape) != (text_len + image_len, 3):
            raise ValueError(f"position_ids must have shape (text_seq + image_seq, 3) = ({text_len + image_len}, 3), "
                             f"got {tuple(position_ids.shape)}")
        if return_block is not None and not 1 <= return_block <= len(self.transformer_blocks):
            raise ValueError(f"return_block must be in [1, {len(self.transformer_blocks)}], got {return_block}")

        temb = self.time_embed(timestep, hidden_states.dtype)  # (B, 1, hidden)
        time = F.gelu(temb, approximate="tanh")
        tokens = [self.txt_in(self.text_fusion(encoder_hidden_states, self._key_mask(encoder_attention_mask)))]
        if self.time_tokens_in is not None:
            tokens.insert(0, self.time_tokens_in(time).view(batch, self.config.time_tokens, -1))
        tokens.append(self.img_in(hidden_states))
        x = torch.cat(tokens, dim=1)
        start = x.shape[1] - image_len
        mask = self._key_mask(encoder_attention_mask, start - text_len, image_len)
        if self.time_mod_proj is not None:
            time = self.time_mod_proj(time)
        rope = self.rope(position_ids)

        features = None
        for index, block in enumerate(self.transformer_blocks, start=1):
            x = block(x, time, rope, mask)
            if index == return_block:
                features = x[:, start:]
        velocity = self.final_layer(x[:, start:], temb)
        return velocity if features is None else (velocity, features)

    @staticmethod
    def _key_mask(text_mask: Tensor | None, before: int = 0, after: int = 0) -> Tensor | None:
        """(B, 1, 1, keys) bool: padded text tokens are never attended to; ``before``/``after`` valid tokens
        around the text. Padded tokens' own outputs are garbage that is never read back."""
        if text_mask is None:
            return None
        valid = text_mask.new_ones(())
        parts = [valid.expand(text_mask.shape[0], before), text_mask, valid.expand(text_mask.shape[0], after)]
        return torch.cat(parts, dim=1)[:, None, None, :]


def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), each token's features channel-major (as diffusers' Krea 2 pipeline)."""
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
    x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int, channels: int) -> Tensor:
    """Inverse of ``patchify``: (B, (H/p)(W/p), C p p) -> (B, C, H, W); height/width are the latent size."""
    p = patch_size
    expected = ((height // p) * (width // p), channels * p * p)
    if height % p or width % p or tuple(tokens.shape[1:]) != expected:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match a {channels}x{height}x{width} latent "
                         f"in patches of {p} (expected (B, {expected[0]}, {expected[1]}))")
    x = tokens.view(tokens.shape[0], height // p, width // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(tokens.shape[0], channels, height, width)


def position_ids(text_len: int, grid_h: int, grid_w: int, device: torch.device | str | None = None) -> Tensor:
    """(text_len + grid_h * grid_w, 3) long: text rows zero, image row-major rows (0, i, j)."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return torch.cat([image.new_zeros(text_len, 3), image])


def modulation_parameter_report(config: DiTConfig) -> dict[str, int | float]:
    """Parameter counts of the shared-bias modulation (one ``time_mod_proj`` + a 6 x hidden table per block) against
    per-block adaLN MLPs (DiT/MMDiT style), everything else equal. Counted on the meta device: nothing is
    allocated, so the full Krea 2 size is fine."""
    report: dict[str, int | float] = {}
    for design in ("shared_bias", "adaln_mlp"):
        with torch.device("meta"):
            model = Krea2DiT(dataclasses.replace(config, modulation=design))
        params = dict(model.named_parameters())
        modulation = sum(p.numel() for name, p in params.items() if name.startswith("time_mod_proj.") or (
            name.startswith("transformer_blocks.") and (".adaLN." in name or name.endswith(".scale_shift_table"))))
        report[f"{design}_total"] = sum(p.numel() for p in params.values())
        report[f"{design}_modulation"] = modulation
    report["saving"] = report["adaln_mlp_total"] - report["shared_bias_total"]
    report["adaln_mlp_modulation_fraction"] = report["adaln_mlp_modulation"] / report["adaln_mlp_total"]
    report["shared_bias_modulation_fraction"] = report["shared_bias_modulation"] / report["shared_bias_total"]
    return report
