"""Preference losses on a rectified-flow model: Diffusion-DPO and STPO.

Diffusion-DPO (Wallace et al. 2023) replaces the intractable log-likelihood ratio of an image under the policy and
the frozen reference with their denoising errors at one shared (noise, t). For the velocity target:

    err(x0)  = mean((v(x_t, t) - (noise - x0))^2)            per sample, flow-MSE units
    Δ        = err_policy(x0) - err_reference(x0)            Δ > 0: the policy fits x0 worse than the reference
    r        = -β Δ                                          implicit log-likelihood ratio log p_θ/p_ref (DPO's
                                                             "implicit reward"), in logit units
    z        = r_w - r_l = -β (Δ_w - Δ_l)                    the pair's margin (winner w, loser l)

    DPO:   L = -log σ(z)

DPO only asks for a large margin, and in practice it gets one by lowering the likelihood of *both* images, the
loser faster (report, "Preference optimization": policy divergence); the winner then falls below the reference
and the model drifts from the pretraining distribution (high-frequency artifacts late in training). STPO keeps
DPO's push on the margin and bounds that drift:

    STPO:  L = -log σ(min(z, κ))  +  λ_w · relu(-r_w)  +  λ_l · relu(-r_l - β τ)
             = -log σ(min(z, κ))  +  λ_w · β · relu(Δ_w)  +  λ_l · β · relu(Δ_l - τ)

(a) the cap κ (``max_margin``): past it the DPO term is constant, so a pair whose margin is reached stops pushing
    the two likelihoods apart (DPO's push decays only as σ(-z), never reaching zero);
(b) the winner hinge (``winner_weight`` λ_w): the winner may not fall below the reference;
(c) the loser hinge (``loser_weight`` λ_l, ``loser_tolerance`` τ in flow-MSE units): the loser may fall by τ, no
    further.

The hinges are scaled by β so they are in the DPO term's units: DPO's gradient in Δ_w is β σ(-z) <= β, a hinge's
is λ β. With λ_w = 1 the winner hinge, once active, outweighs any push DPO can put on the winner through the shared
weights; with λ_l = 0.5 the loser hinge stops the loser's fall once σ(-z) < 0.5, i.e. once the pair is ranked right.
The reference errors are constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from krea2_core.post.config import PreferenceLossConfig


def _check(errors: dict[str, Tensor]) -> None:
    shapes = {name: tuple(e.shape) for name, e in errors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or first[0] == 0 or any(s != first for s in shapes.values()):
        raise ValueError(f"preference_loss needs four per-pair error vectors of one shape (B,), B >= 1, got {shapes}")


def preference_loss(err_policy_w: Tensor, err_policy_l: Tensor, err_ref_w: Tensor, err_ref_l: Tensor,
                    config: PreferenceLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean DPO or STPO loss (``config.kind``) over B pairs, from each pair's per-sample flow errors (B,), and
    detached statistics (0-d float32 tensors, batch means):

    ``dpo_loss`` (-log σ(z), uncapped, for both kinds), ``implicit_loglik.winner`` / ``.loser`` (r_w, r_l),
    ``margin`` (z), ``accuracy`` (fraction with Δ_w < Δ_l), ``hinge.winner`` (relu(-r_w)) and ``hinge.loser``
    (relu(-r_l - βτ)) unweighted, ``capped`` (fraction with z >= κ)."""
    _check({"err_policy_w": err_policy_w, "err_policy_l": err_policy_l, "err_ref_w": err_ref_w,
            "err_ref_l": err_ref_l})
    beta = config.beta
    r_w = -beta * (err_policy_w.float() - err_ref_w.detach().float())
    r_l = -beta * (err_policy_l.float() - err_ref_l.detach().float())
    z = r_w - r_l
    hinge_w = F.relu(-r_w)
    hinge_l = F.relu(-r_l - beta * config.loser_tolerance)
    if config.kind == "dpo":
        per_pair = F.softplus(-z)  # -log σ(z), stable for any z
    else:
        per_pair = (F.softplus(-z.clamp(max=config.max_margin)) + config.winner_weight * hinge_w
                    + config.loser_weight * hinge_l)
    loss = per_pair.mean()
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "dpo_loss": F.softplus(-z).mean(),
            "implicit_loglik.winner": r_w.mean(),
            "implicit_loglik.loser": r_l.mean(),
            "margin": z.mean(),
            "accuracy": (r_w > r_l).float().mean(),
            "hinge.winner": hinge_w.mean(),
            "hinge.loser": hinge_l.mean(),
            "capped": (z >= config.max_margin).float().mean(),
        }
    return loss, {name: value.detach() for name, value in stats.items()}
