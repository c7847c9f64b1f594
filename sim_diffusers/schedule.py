"""The VP noise schedule in the paper's terms, and the conditioning timestep t* of the one-step generator.

PixArt-alpha is a discrete-time VP diffusion: x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alphabar[t])
and sigma_t = sqrt(1 - alphabar[t]) (its scheduler calls alphabar `alphas_cumprod`). SIM's published generator is
described in VE units (sigma_init = 2.5); the VE noise level of a VP timestep is sigma_t / alpha_t.

Only torch is imported here: the pipeline, the losses and the trainer all read the schedule through these functions.
"""

from __future__ import annotations

import torch

# SIM-DiT-600M conditions its generator on VE sigma_init = 2.5 (about t = 440 with PixArt's linear betas).
DEFAULT_SIGMA_INIT = 2.5


def alphas_cumprod_of(scheduler) -> torch.Tensor:
    """alphabar[t] for t = 0..T-1, as float32, from any diffusers DDPM-family scheduler."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"{type(scheduler).__name__} does not carry a discrete noise schedule (`alphas_cumprod`).")
    return alphas_cumprod.detach().to(dtype=torch.float32, device="cpu")


def ve_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level sqrt((1 - alphabar) / alphabar) of every VP timestep."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_for_ve_sigma(alphas_cumprod: torch.Tensor, sigma: float = DEFAULT_SIGMA_INIT) -> int:
    """The DDPM timestep whose VE noise level is nearest to `sigma` (t* = 440 for sigma 2.5 and PixArt's schedule)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    return int((ve_sigma(alphas_cumprod) - sigma).abs().argmin())


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) per timestep, shaped like `timesteps`, on its device, in float32."""
    alphabar = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return alphabar.sqrt(), (1.0 - alphabar).sqrt()


def diffuse(
    x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward diffusion x_t = alpha_t x0 + sigma_t eps, per sample.

    x0, noise: (B, C, H, W); timesteps: (B,) DDPM indices. Returns x_t in x0's dtype and (B,) float32 alpha_t, sigma_t.
    """
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x_t = alpha.view(shape).to(x0.dtype) * x0 + sigma.view(shape).to(x0.dtype) * noise.to(x0.dtype)
    return x_t, alpha, sigma


def check_timestep(alphas_cumprod: torch.Tensor, timestep: int, name: str = "conditioning_timestep") -> int:
    """Validate a timestep index against the schedule and return it as int."""
    num_train_timesteps = alphas_cumprod.shape[0]
    if not 0 <= int(timestep) < num_train_timesteps:
        raise ValueError(f"{name} must be in [0, {num_train_timesteps - 1}], got {timestep}.")
    return int(timestep)
