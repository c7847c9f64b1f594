"""The teacher's multistep sampler as a plain function of an epsilon function: used for the regression targets of
the trainer (`sim_diffusers.training.step.teacher_ode_targets`) and by the ground-truth benchmark."""

from __future__ import annotations

import copy
from typing import Callable

import torch


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
