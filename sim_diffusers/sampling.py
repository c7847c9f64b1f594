"""The teacher's multistep sampler: DPM-Solver++ as a plain function of an epsilon function, and the guided teacher's
ODE solution from a given noise (the regression target of the trainer, `training.step.teacher_ode_targets`, and the
teacher's sampler of the ground-truth benchmark)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .generator import guided_eps


def ode_scheduler(scheduler_or_config):
    """DPM-Solver++ (PixArt-alpha's sampler) on the teacher's noise schedule, whatever scheduler the teacher ships."""
    from diffusers import DPMSolverMultistepScheduler

    if isinstance(scheduler_or_config, DPMSolverMultistepScheduler):
        return copy.deepcopy(scheduler_or_config)
    return DPMSolverMultistepScheduler.from_config(getattr(scheduler_or_config, "config", scheduler_or_config))


def dpm_solver_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, noise: torch.Tensor, num_inference_steps
) -> torch.Tensor:
    """PixArtAlphaPipeline's denoising loop with any eps_fn(x_t, t), from x_T = noise * init_noise_sigma.

    `scheduler` is copied, never stepped, so one instance can serve concurrent callers.
    """
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = eps_fn(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def teacher_ode_sample(
    transformer,
    scheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    negative_prompt_attention_mask: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """x0 of the guided teacher's probability-flow ODE started at x_T = noise: `num_inference_steps` of `scheduler`
    (DPM-Solver++, see `ode_scheduler`) on eps_u + g (eps_c - eps_u). noise: (B, C, h, w); embeddings (B, L, D).

    The transformer runs in its own dtype; the solver's state stays in the noise's dtype (float32 under mixed
    precision), as in PixArtAlphaPipeline's loop."""
    dtype = transformer.dtype
    cond, uncond = prompt_embeds.to(dtype), negative_prompt_embeds.to(dtype)

    def eps_fn(x_t, t):
        return guided_eps(
            transformer,
            x_t.to(dtype),
            t,
            cond,
            prompt_attention_mask,
            uncond,
            negative_prompt_attention_mask,
            guidance_scale,
            added_cond_kwargs,
        )

    return dpm_solver_sample(eps_fn, scheduler, noise, num_inference_steps)
