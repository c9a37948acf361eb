"""Flow-GRPO's SDE sampler: the step's ODE limit and Gaussian log-probability, marginals of a flow whose exact
velocity is known (Gaussian data), and rollouts that depend only on (seed, round, sample index)."""

from __future__ import annotations

import math

import pytest
import torch

from krea2_core.diffusion.sampling import euler_sample, inference_timesteps
from krea2_core.post.flow_sde import (
    gaussian_kl,
    gaussian_log_prob,
    sample_generator,
    sde_rollout,
    sde_sigma,
    sde_step,
    sde_trajectory,
)
from krea2_core.training.image_model import ModelIndex, new_model, text_to_image

from ._checkpoints import PRETRAIN, RESOLUTION

CPU = torch.device("cpu")
MU, S = 0.5, 0.3  # the data: every element of x0 ~ N(MU, S^2), independent


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_t = x] for Gaussian data: x_t is Gaussian, so both posteriors are linear in x."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    var = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    return t / var * centred - (MU + (1 - t) * S**2 / var * centred)


def test_the_step_is_the_euler_ode_step_as_the_noise_level_vanishes() -> None:
    x, v = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    for t, t_next in ((1.0, 0.9), (0.6, 0.45), (0.2, 0.1)):
        mean, std = sde_step(x, v, t, t_next, noise_level=1e-6)
        assert std < 1e-6
        torch.testing.assert_close(mean, x + (t_next - t) * v, rtol=0, atol=1e-6)


def test_the_step_drifts_along_the_score_by_half_the_injected_variance() -> None:
    x, v = torch.randn(2, 6), torch.randn(2, 6)
    t, t_next, a = 0.6, 0.5, 0.7
    mean, std = sde_step(x, v, t, t_next, noise_level=a)
    sigma = a * math.sqrt(t / (1 - t))
    score = -(x + (1 - t) * v) / t  # -eps_hat / t
    torch.testing.assert_close(mean, x - 0.1 * v + 0.1 * sigma**2 / 2 * score, rtol=1e-6, atol=1e-6)
    assert std == pytest.approx(sigma * math.sqrt(0.1))


def test_sigma_is_finite_at_t_1_where_one_minus_t_is_floored_at_the_step() -> None:
    assert sde_sigma(1.0, 0.1, 0.7) == pytest.approx(0.7 * math.sqrt(1.0 / 0.1))  # Flow-GRPO: 1 - t' = dt
    assert sde_sigma(0.5, 0.1, 0.7) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="0 <= t_next < t <= 1"):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.6, 0.7)


def test_log_prob_is_the_normal_log_density_averaged_over_elements() -> None:
    mean, sample = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    expected = torch.distributions.Normal(mean, 0.37).log_prob(sample).flatten(1).mean(dim=1)
    torch.testing.assert_close(gaussian_log_prob(sample, mean, 0.37), expected)
    assert gaussian_log_prob(sample, mean, 0.37).shape == (3,)


def test_kl_is_the_closed_form_between_two_gaussians_of_one_std() -> None:
    mean, ref = torch.randn(2, 8), torch.randn(2, 8)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, 0.3),
                                                 torch.distributions.Normal(ref, 0.3)).mean(dim=1)
    torch.testing.assert_close(gaussian_kl(mean, ref, 0.3), expected)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_sampling_of_gaussian_data_reproduces_its_marginals_like_the_ode(shift: float) -> None:
    batch, steps = 2000, 50
    generators = [sample_generator(0, 0, i) for i in range(batch)]
    noise = torch.stack([torch.randn(16, generator=g) for g in generators])
    times = inference_timesteps(steps, shift)
    states, log_probs = sde_trajectory(exact_velocity, noise, times, 0.7, generators)
    assert states.shape == (steps + 1, batch, 16) and log_probs.shape == (steps - 1, batch)
    ode = euler_sample(exact_velocity, noise, steps=steps, shift=shift)
    for x in (states[-1], ode):
        assert x.mean().item() == pytest.approx(MU, abs=0.01)
        assert x.std().item() == pytest.approx(S, abs=0.03)
    # halfway, the SDE's states follow the marginal N((1 - t) MU, (1 - t)^2 S^2 + t^2) too
    t = times[steps // 2].item()
    middle = states[steps // 2]
    assert middle.mean().item() == pytest.approx((1 - t) * MU, abs=0.01)
    assert middle.std().item() == pytest.approx(math.sqrt((1 - t) ** 2 * S**2 + t**2), rel=0.03)
    # and they are stochastic: the SDE's samples are not the ODE's
    assert (states[-1] - ode).abs().mean() > 0.05


def test_the_trajectory_rejects_mismatched_generators_and_too_short_grids() -> None:
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sde_trajectory(exact_velocity, torch.zeros(3, 4), inference_timesteps(4, 1.0), 0.7,
                       [torch.Generator()] * 2)
    with pytest.raises(ValueError, match="at least 3 points"):
        sde_trajectory(exact_velocity, torch.zeros(1, 4), inference_timesteps(1, 1.0), 0.7, [torch.Generator()])


# --------------------------------------------------------------------------- rollouts of the DiT


@pytest.fixture(scope="module")
def pipe():  # noqa: ANN201
    return text_to_image(new_model(PRETRAIN.model, CPU, seed=PRETRAIN.seed), ModelIndex.of(PRETRAIN), PRETRAIN.parallel, CPU)


PROMPTS = ["a red circle", "a red circle", "a blue square", "a blue square"]


def _rollout(pipe, prompts: list[str], index: list[int], step: int = 0):  # noqa: ANN001, ANN202
    return sde_rollout(pipe, prompts, index, steps=4, shift=2.0, noise_level=0.7, seed=3, step=step,
                       width=RESOLUTION, height=RESOLUTION)


def test_a_rollout_holds_states_log_probs_times_text_and_images(pipe) -> None:  # noqa: ANN001
    rollout = _rollout(pipe, PROMPTS, [0, 1, 2, 3])
    tokens = (RESOLUTION // 4 // 2) ** 2
    assert rollout.states.shape == (5, 4, tokens, 192) and rollout.log_probs.shape == (3, 4)
    torch.testing.assert_close(rollout.times, inference_timesteps(4, 2.0))
    assert len(rollout.images) == 4 and rollout.images[0].size == (RESOLUTION, RESOLUTION)
    assert torch.isfinite(rollout.log_probs).all()
    assert torch.equal(rollout.text[0], rollout.text[1]) and not torch.equal(rollout.text[0], rollout.text[2])
    assert rollout.images[0].tobytes() == pipe.decode(rollout.states[-1, :1], rollout.grid)[0].tobytes()


def test_rollouts_repeat_by_seed_and_a_slice_samples_what_the_whole_batch_does(pipe) -> None:  # noqa: ANN001
    whole = _rollout(pipe, PROMPTS, [0, 1, 2, 3])
    again = _rollout(pipe, PROMPTS, [0, 1, 2, 3])
    assert torch.equal(whole.states, again.states) and torch.equal(whole.log_probs, again.log_probs)
    # the same prompt twice in a group: different samples
    assert (whole.states[-1, 0] - whole.states[-1, 1]).abs().mean() > 0.1
    part = _rollout(pipe, PROMPTS[2:], [2, 3])  # what a second rank holds
    torch.testing.assert_close(part.states, whole.states[:, 2:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(part.log_probs, whole.log_probs[:, 2:], rtol=1e-4, atol=1e-4)
    other_round = _rollout(pipe, PROMPTS, [0, 1, 2, 3], step=1)
    assert not torch.allclose(other_round.states[0], whole.states[0])


def test_rollouts_reject_bad_input(pipe) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="2 prompts for 3 sample indices"):
        _rollout(pipe, PROMPTS[:2], [0, 1, 2])
    with pytest.raises(ValueError, match="steps >= 2"):
        sde_rollout(pipe, PROMPTS, [0, 1, 2, 3], steps=1, shift=1.0, noise_level=0.7, seed=0, step=0,
                    width=RESOLUTION, height=RESOLUTION)
    with pytest.raises(ValueError, match="multiples of 8"):
        sde_rollout(pipe, PROMPTS, [0, 1, 2, 3], steps=2, shift=1.0, noise_level=0.7, seed=0, step=0,
                    width=RESOLUTION + 4, height=RESOLUTION)
