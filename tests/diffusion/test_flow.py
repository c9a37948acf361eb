"""Rectified flow (timesteps, noising, loss) and the Euler / CFG sampler, checked against exact flows."""

from __future__ import annotations

import pytest
import torch

from krea2_core.diffusion.flow import (
    VALIDATION_TIMESTEPS,
    add_noise,
    flow_loss,
    sample_timesteps,
    shift_time,
    validation_loss,
    velocity_target,
)
from krea2_core.diffusion.sampling import euler_sample, guided, inference_timesteps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- timesteps


def test_shift_one_is_identity_and_shift_is_monotone_and_keeps_the_ends() -> None:
    t = torch.linspace(0, 1, 101)
    assert torch.equal(shift_time(t, 1.0), t)
    for shift in (0.5, 3.0):
        s = shift_time(t, shift)
        assert s[0] == 0 and s[-1] == 1 and bool((s.diff() > 0).all())
    assert bool((shift_time(t, 3.0) >= t).all()), "shift > 1 moves timesteps towards noise"


def test_bad_shift_is_rejected() -> None:
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_time(torch.rand(3), 0.0)


def test_timesteps_are_a_shifted_logit_normal() -> None:
    for shift in (1.0, 3.0):
        t = sample_timesteps(200_000, shift=shift, generator=_gen(), mean=0.3, std=0.8)
        assert t.dtype == torch.float32 and t.shape == (200_000,) and bool(((t > 0) & (t < 1)).all())
        logit = torch.logit(t.double())
        # the shift is a constant log(shift) in logit space
        assert logit.mean().item() == pytest.approx(0.3 + torch.log(torch.tensor(shift)).item(), abs=0.01)
        assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_timesteps_depend_only_on_the_generator() -> None:
    a = sample_timesteps(16, shift=2.0, generator=_gen(5))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, sample_timesteps(16, shift=2.0, generator=_gen(5)))
    assert not torch.equal(a, sample_timesteps(16, shift=2.0, generator=_gen(6)))


def test_bad_timestep_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_timesteps(0, shift=1.0, generator=_gen())
    with pytest.raises(ValueError, match="std > 0"):
        sample_timesteps(4, shift=1.0, generator=_gen(), std=0.0)


# --------------------------------------------------------------------------- noising and loss


def test_add_noise_interpolates_per_sample() -> None:
    x0, noise = torch.randn(3, 5, 4, generator=_gen(1)), torch.randn(3, 5, 4, generator=_gen(2))
    x_t = add_noise(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])


def test_add_noise_rejects_mismatched_shapes() -> None:
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t must have shape"):
        add_noise(x0, x0, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x0, torch.zeros(2, 4), torch.zeros(2))


def test_exact_velocity_has_zero_loss_and_errors_are_mse() -> None:
    x0, noise = torch.randn(4, 6, 3, generator=_gen(1)), torch.randn(4, 6, 3, generator=_gen(2))
    target = velocity_target(x0, noise)
    assert flow_loss(target, x0, noise).item() == 0.0
    assert flow_loss(target + 2.0, x0, noise).item() == pytest.approx(4.0)
    assert flow_loss((target + 2.0).bfloat16(), x0, noise).dtype == torch.float32
    pred = target.clone()
    pred[1] += 1.0  # only sample 1 is wrong; weighting it out gives zero
    assert flow_loss(pred, x0, noise).item() == pytest.approx(0.25)
    assert flow_loss(pred, x0, noise, weight=torch.tensor([1.0, 0.0, 1.0, 1.0])).item() == 0.0
    with pytest.raises(ValueError, match="pred must have the target's shape"):
        flow_loss(target[:, :3], x0, noise)


def test_validation_loss_is_reported_per_fixed_timestep() -> None:
    x0, noise = torch.randn(2, 8, 3, generator=_gen(1)), torch.randn(2, 8, 3, generator=_gen(2))
    exact = validation_loss(lambda x, t: noise - x0, x0, noise)
    assert list(exact) == list(VALIDATION_TIMESTEPS) and all(v == 0.0 for v in exact.values())
    zero = validation_loss(lambda x, t: torch.zeros_like(x), x0, noise, (0.3,))
    assert zero[0.3] == pytest.approx((noise - x0).square().mean().item())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        validation_loss(lambda x, t: x, x0, noise, (1.5,))


# --------------------------------------------------------------------------- sampling


def test_inference_timesteps_go_from_noise_to_data() -> None:
    for shift in (1.0, 3.0):
        times = inference_timesteps(10, shift)
        assert times.shape == (11,) and times[0] == 1 and times[-1] == 0 and bool((times.diff() < 0).all())
    torch.testing.assert_close(inference_timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        inference_timesteps(0, 1.0)


def test_euler_with_the_exact_field_of_one_pair_recovers_the_data() -> None:
    x0, noise = torch.randn(2, 8, 3, generator=_gen(1)), torch.randn(2, 8, 3, generator=_gen(2))
    # the training target itself (a constant field), and the exact field of a point mass at x0, (x - x0) / t:
    # Euler is exact for both, so any step count and shift must land on x0
    torch.testing.assert_close(euler_sample(lambda x, t: noise - x0, noise, steps=3, shift=2.0), x0)
    point_mass = lambda x, t: (x - x0) / t.view(-1, 1, 1)  # noqa: E731
    torch.testing.assert_close(euler_sample(point_mass, noise, steps=5, shift=3.0), x0)


def test_euler_transports_gaussian_noise_to_gaussian_data() -> None:
    mu, s = torch.tensor([2.0, -1.0, 0.5]), 0.3  # data ~ N(mu, s^2); its exact flow maps noise n to mu + s * n

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = (1 - t).view(-1, 1, 1), t.view(-1, 1, 1)
        var = a**2 * s**2 + b**2
        denoised = mu + a * s**2 / var * (x - a * mu)  # E[x0 | x_t]
        expected_noise = b / var * (x - a * mu)  # E[noise | x_t]
        return expected_noise - denoised

    noise = torch.randn(64, 4, 3, generator=_gen(3))
    target = mu + s * noise
    errors = [(euler_sample(exact, noise, steps=steps, shift=1.0) - target).abs().max().item() for steps in (10, 100)]
    assert errors[1] < 0.03 and errors[0] / errors[1] > 8, f"Euler should converge at first order: {errors}"
    shifted = euler_sample(exact, noise, steps=200, shift=3.0, progress=True)
    assert (shifted - target).abs().max().item() < 0.03


def test_euler_keeps_the_noise_dtype() -> None:
    noise = torch.randn(2, 4, 3, generator=_gen()).bfloat16()
    seen = []
    out = euler_sample(lambda x, t: seen.append(x.dtype) or -x, noise, steps=2, shift=1.0)
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16] * 2


# --------------------------------------------------------------------------- classifier-free guidance


class _Toy:
    """A deterministic stand-in for the model that mixes image, time and masked text; counts its calls."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        text = (hidden * mask[..., None]).sum(dim=1, keepdim=True)  # (B, 1, D)
        return x * t.view(-1, 1, 1) + text[..., : x.shape[-1]] ** 2


def _text(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(batch, 5, 4, generator=_gen(seed))
    return hidden, torch.tensor([[True] * 3 + [False] * 2] * batch)


def test_guidance_matches_separate_calls_in_one_batched_call() -> None:
    model = _Toy()
    x, t = torch.randn(3, 6, 4, generator=_gen(9)), torch.tensor([0.2, 0.5, 0.9])
    cond, uncond = _text(3, 1), _text(3, 2)
    v_cond, v_uncond = model(x, t, *cond), model(x, t, *uncond)
    model.batches.clear()
    guided_v = guided(model, cond, uncond, 4.0)(x, t)
    assert model.batches == [6]
    torch.testing.assert_close(guided_v, v_uncond + 4.0 * (v_cond - v_uncond))


def test_guidance_scale_one_is_the_conditional_model_alone() -> None:
    model = _Toy()
    x, t = torch.randn(2, 6, 4, generator=_gen(9)), torch.tensor([0.3, 0.7])
    cond = _text(2, 1)
    assert torch.equal(guided(model, cond, _text(2, 2), 1.0)(x, t), model(x, t, *cond))
    assert model.batches == [2, 2]


def test_one_unconditional_prompt_serves_the_whole_batch() -> None:
    model = _Toy()
    x, t = torch.randn(3, 6, 4, generator=_gen(9)), torch.full((3,), 0.5)
    cond, uncond = _text(3, 1), _text(1, 2)
    expanded = (uncond[0].expand(3, -1, -1), uncond[1].expand(3, -1))
    torch.testing.assert_close(guided(model, cond, uncond, 3.0)(x, t), guided(model, cond, expanded, 3.0)(x, t))


def test_guidance_rejects_text_of_different_lengths() -> None:
    hidden, mask = _text(2, 2)
    with pytest.raises(ValueError, match="same shapes"):
        guided(_Toy(), _text(2, 1), (hidden[:, :4], mask[:, :4]), 2.0)
