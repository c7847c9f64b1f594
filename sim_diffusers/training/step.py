"""The two losses of one SIM iteration, as functions of the networks and one batch (no Accelerate, no DDP).

Shared sample: x0 = G(z, c) is computed once per iteration and used by both updates. The generator's parameters do
not change between the fake-score update and the generator update, so a second generator forward would recompute the
same x0 (and its graph) exactly; the fake-score update reads x0.detach(). The cost is that the generator's graph is
held in memory through the fake-score update (small with gradient checkpointing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import sampling
from ..losses import fake_score_loss, loss_weight, regression_loss
from ..schedule import diffuse


@dataclass
class Conditioning:
    """Text conditioning of a batch: caption embeddings (B, L, D) + mask (B, L), the empty prompt's, and the
    micro-conditions."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_prompt_attention_mask: torch.Tensor
    added_cond_kwargs: dict | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of the samples `index` of the batch."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {
                k: (v[index] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in self.added_cond_kwargs.items()
            }
        return Conditioning(
            self.prompt_embeds[index],
            self.prompt_attention_mask[index],
            self.negative_prompt_embeds[index],
            self.negative_prompt_attention_mask[index],
            added,
        )

    @property
    def cond(self):
        return self.prompt_embeds, self.prompt_attention_mask

    @property
    def uncond(self):
        return self.negative_prompt_embeds, self.negative_prompt_attention_mask


def fake_score_update_loss(networks, fake_module, x0, timesteps, noise, conditioning: Conditioning, alphas_cumprod):
    """Denoising score matching of F on the generator's samples (x0 detached: this update never reaches G)."""
    x_t, _, _ = diffuse(x0.detach(), timesteps, noise, alphas_cumprod)
    eps_fake = networks.fake_eps(x_t, timesteps, conditioning.cond, conditioning.added_cond_kwargs, module=fake_module)
    return fake_score_loss(eps_fake, noise)


def generator_update_loss(
    networks,
    x0,
    timesteps,
    noise,
    conditioning: Conditioning,
    alphas_cumprod,
    divergence,
    guidance_scale: float,
    weighting: str,
    divergence_options: dict | None = None,
):
    """The generator's divergence loss on x_t built from x0 WITH its graph; F's parameters frozen.

    For divergences that need input gradients (sim, sim_l2, sid), the teacher (both guidance branches in one batched
    forward) and F run with autograd on, so the gradient reaches x0 through eps_teacher and eps_fake. Others (dmd) run
    them under no_grad. Returns (loss, stats) with stats = detached diagnostics.
    """
    x_t, alpha, sigma = diffuse(x0, timesteps, noise, alphas_cumprod)
    grad_context = contextlib.nullcontext() if divergence.needs_input_grad else torch.no_grad()
    with networks.fake_score_frozen(), grad_context:
        eps_teacher = networks.teacher_eps(
            x_t, timesteps, conditioning.cond, conditioning.uncond, guidance_scale, conditioning.added_cond_kwargs
        )
        eps_fake = networks.fake_eps(x_t, timesteps, conditioning.cond, conditioning.added_cond_kwargs)
    weight = loss_weight(sigma, alpha, weighting)
    loss = divergence.loss(eps_teacher, eps_fake, noise, sigma, x_t=x_t, weight=weight, **(divergence_options or {}))
    with torch.no_grad():
        gap = (eps_teacher.float() - eps_fake.float()).square().flatten(1).mean(1).mean()
    return loss, {"eps_gap": gap}


def teacher_ode_targets(networks, scheduler, noise, conditioning: Conditioning, guidance_scale, num_inference_steps):
    """x0 of the guided teacher's ODE (DPM-Solver++, `scheduler`) started at x_T = noise: the generator's own z, so
    the pair (z, target) tells the generator which mode z belongs to (regression term, see losses.regression_loss).
    The teacher runs as in the generator step: in its weight dtype, LoRA adapters of the fake score switched off."""
    with networks.teacher_mode():
        return sampling.teacher_ode_sample(
            networks.teacher,
            scheduler,
            noise,
            *conditioning.cond,
            *conditioning.uncond,
            guidance_scale,
            num_inference_steps,
            conditioning.added_cond_kwargs,
        )


def regression_term(x0, targets, index, expected_count: float, distance: str = "l2", huber_c=None):
    """Sum of the per-sample regression losses (`losses.regression_loss` with `distance`) of the samples `index`, over
    the number of such samples a batch holds on average: the term is unbiased whatever the split of the global batch
    over processes (a local batch may hold none)."""
    if len(index) == 0:
        return x0.sum() * 0.0
    return regression_loss(x0[index], targets.to(x0.dtype), distance, huber_c).sum() / expected_count
