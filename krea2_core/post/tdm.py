"""Our implementation of TDM's trajectory-level distribution matching (Luo et al. 2025): guidance and timestep
distillation of a CFG teacher into a few-step student that samples without CFG, data-free (prompts and noise only).
Hand-written: no maintained library implements TDM for our model.

Student G (initialised from the teacher), K student steps on the grid tau_0 = 1 > ... > tau_K = 0
(``inference_timesteps(K, shift)``). Student step k: ``v = G(x_k, tau_k)`` without CFG, its clean estimate
``x0_hat_k = x_k - tau_k v`` and the Euler (= DDIM for rectified flow) step ``x_{k+1} = x_k + (tau_{k+1} - tau_k) v``.

One training sample: a student step k (uniform), the student run from noise to tau_k without grad, then step k
with grad -> ``x0_hat_k``. It is diffused inside the step's own interval: ``t = shift(1 - (k + u) / K)``,
``u ~ U[0, 1)`` (uniform in the unshifted time, then the grid's shift: ``t`` in [tau_{k+1}, tau_k]),
``x_t = (1 - t) x0_hat + t eps``. The real score is the teacher with CFG (``teacher_cfg``, one doubled batch):
``x0_real = x_t - t v_real``; the fake score is the fake network (initialised from the teacher, no CFG):
``x0_fake``. DMD's gradient, normalised per sample as in DMD and detached:
``g = (x0_fake - x0_real) / mean|x0_hat - x0_real|``, applied by the surrogate
``loss = 0.5 * mean ||x0_hat - sg(x0_hat - g)||^2`` (d loss / d x0_hat = g / numel). Matching the teacher's
distribution at times inside each step's interval, rather than only the clean images as DMD does, makes each step
land on the CFG teacher's trajectory distribution on its own interval: distribution matching at the trajectory
level, and the CFG teacher makes it guidance distillation too.

The fake score tracks the student's distribution: flow matching on the detached ``x0_hat`` at times drawn from
the same interval distribution, target ``eps - x0_hat`` (``fake_score_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from krea2_core.diffusion.flow import VelocityFn, add_noise, flow_loss, shift_time
from krea2_core.diffusion.sampling import ModelFn
from krea2_core.diffusion.text_to_image import TextToImage


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def predicted_x0(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    """The clean estimate ``x_t - t v`` (float32)."""
    return x_t.float() - _per_sample(t.float(), x_t) * velocity.float()


def interval_times(step: Tensor, u: Tensor, *, steps: int, shift: float) -> Tensor:
    """Times inside each student step's interval [tau_{k+1}, tau_k]: ``u`` in [0, 1) placed uniformly in the
    unshifted interval, then shifted like the student's grid. ``step`` (B,), ``u`` (B,) or (..., B)."""
    if ((step < 0) | (step >= steps)).any():
        raise ValueError(f"student steps must be in [0, {steps}), got {step.tolist()}")
    return shift_time(1.0 - (step.float() + u.float()) / steps, shift)


@torch.no_grad()
def student_rollout(student: ModelFn, noise: Tensor, step: Tensor, text: Tensor, mask: Tensor, *, times: Tensor,
                    n_steps: int) -> Tensor:
    """Each sample's state at ``tau_k`` (k = ``step``, (B,)): the student's Euler steps from ``noise`` (tau_0),
    without CFG and without grad. ``n_steps`` (>= max k) model calls on the whole batch, a sample moving only while
    j < k: every data-parallel rank must make the same number of calls (FSDP gathers weights in each)."""
    if n_steps < int(step.max()):
        raise ValueError(f"n_steps ({n_steps}) must cover the largest student step ({int(step.max())})")
    x = noise.float()
    for j in range(n_steps):
        v = student(x.to(noise.dtype), times[j].expand(len(x)), text, mask).float()
        x = torch.where(_per_sample(step > j, x), x + (times[j + 1] - times[j]) * v, x)
    return x


def student_x0(student: ModelFn, x: Tensor, step: Tensor, text: Tensor, mask: Tensor, *, times: Tensor) -> Tensor:
    """Student step k from ``x`` at ``tau_k`` (with grad): ``x0_hat_k = x - tau_k G(x, tau_k)``."""
    tau = times[step]
    return predicted_x0(x, tau, student(x, tau, text, mask))


def dmd_gradient(x0_hat: Tensor, x0_fake: Tensor, x0_real: Tensor, eps: float = 1e-6) -> Tensor:
    """DMD's per-sample normalised gradient ``(x0_fake - x0_real) / mean|x0_hat - x0_real|`` (float32, no grad)."""
    x0_hat, x0_fake, x0_real = (x.detach().float() for x in (x0_hat, x0_fake, x0_real))
    scale = (x0_hat - x0_real).abs().flatten(1).mean(dim=1).clamp_min(eps)
    return (x0_fake - x0_real) / _per_sample(scale, x0_hat)


def tdm_loss(x0_hat: Tensor, t: Tensor, noise: Tensor, real: VelocityFn, fake: VelocityFn
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The student loss of the module docstring for clean estimates ``x0_hat`` (with grad) diffused to ``t`` with
    ``noise``; ``real`` is the CFG teacher, ``fake`` the fake score. Returns (loss, batch-mean stats: ``loss``,
    ``dmd_grad_rms`` (RMS of g), ``fake_real_gap`` (mean |x0_fake - x0_real|))."""
    x_t = add_noise(x0_hat.detach().float(), noise.float(), t).to(noise.dtype)
    with torch.no_grad():
        x0_real = predicted_x0(x_t, t, real(x_t, t))
        x0_fake = predicted_x0(x_t, t, fake(x_t, t))
    g = dmd_gradient(x0_hat, x0_fake, x0_real)
    x0 = x0_hat.float()
    loss = 0.5 * (x0 - (x0.detach() - g)).square().flatten(1).mean(dim=1).mean()
    return loss, {"loss": loss.detach(), "dmd_grad_rms": g.square().flatten(1).mean(dim=1).sqrt().mean(),
                  "fake_real_gap": (x0_fake - x0_real).abs().mean()}


def fake_score_loss(fake: VelocityFn, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Flow matching of the fake score on the student's (detached) samples ``x0`` at ``t``: target ``noise - x0``."""
    x0 = x0.detach()
    return flow_loss(fake(add_noise(x0.float(), noise.float(), t).to(noise.dtype), t), x0, noise)


def few_step_sample(pipe: TextToImage, prompts: Sequence[str], *, steps: int, shift: float, seed: int, width: int,
                    height: int) -> list[Image.Image]:
    """The student's sampler: ``steps`` Euler steps on ``inference_timesteps(steps, shift)`` without CFG, image i's
    noise from (seed, i) as in ``TextToImage.generate`` (so a teacher image of the same prompt shares it)."""
    return pipe.generate(prompts, width=width, height=height, steps=steps, cfg_scale=1.0, shift=shift, seed=seed)
