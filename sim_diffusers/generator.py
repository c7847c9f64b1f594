"""The one-step generator mapping and the epsilon calls of PixArt transformers: the one home of both.

The pipeline, the trainer, the benchmarks and the evaluation call these functions, so that the generator used in
training and the one users load can never drift apart.

One-step generator (SIM-DiT-600M form; EDM's iDDPM preconditioning with c_skip = 1, c_out = -sigma):
    x_in = sigma_{t*} * z,                 z ~ N(0, I)       (the noisy latent of t* with zero signal)
    eps_hat = transformer(x_in, t*, c)[:, :latent_channels]  (learned-sigma channels dropped)
    x0 = (x_in - sigma_{t*} * eps_hat) / alpha_{t*}

Only torch is imported; the transformer is any module with PixArtTransformer2DModel's call signature.
"""

from __future__ import annotations

import torch

from .schedule import alpha_sigma


def latent_channels_of(transformer) -> int:
    return transformer.config.in_channels


def uses_micro_conditions(transformer) -> bool:
    """PixArt-XL-2-1024-MS conditions on resolution and aspect ratio; the 512 and 256 models do not."""
    flag = getattr(transformer, "use_additional_conditions", None)
    if flag is None:
        flag = transformer.config.get("use_additional_conditions", None)
    if flag is None:
        flag = transformer.config.sample_size == 128
    return bool(flag)


def micro_conditions(
    transformer, batch_size: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor | None]:
    """`added_cond_kwargs` for a batch of images of `height` x `width` pixels, as PixArtAlphaPipeline builds them."""
    if not uses_micro_conditions(transformer):
        return {"resolution": None, "aspect_ratio": None}
    resolution = torch.tensor([height, width], device=device, dtype=dtype).repeat(batch_size, 1)
    aspect_ratio = torch.tensor([float(height / width)], device=device, dtype=dtype).repeat(batch_size, 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


def _repeat_micro_conditions(added_cond_kwargs: dict | None, repeats: int) -> dict | None:
    if added_cond_kwargs is None:
        return None
    return {k: (None if v is None else v.repeat(repeats, 1)) for k, v in added_cond_kwargs.items()}


def predict_eps(
    transformer,
    x_t: torch.Tensor,
    timesteps: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """eps_hat(x_t, t, c) of a PixArt transformer, without its learned-sigma channels.

    x_t: (B, C, h, w) latents; timesteps: int or (B,) or (1,); prompt_embeds: (B, L, D); mask: (B, L).
    """
    batch_size = x_t.shape[0]
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([int(timesteps)], device=x_t.device, dtype=torch.long)
    timesteps = timesteps.to(x_t.device).reshape(-1).expand(batch_size)
    if added_cond_kwargs is None:
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
    out = transformer(
        x_t,
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=prompt_attention_mask,
        timestep=timesteps,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]
    return out[:, : x_t.shape[1]]


def guided_eps(
    transformer,
    x_t: torch.Tensor,
    timesteps: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    negative_prompt_attention_mask: torch.Tensor,
    guidance_scale: float,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """Classifier-free guided epsilon eps_u + g (eps_c - eps_u), in ONE batched forward.

    The unconditional half comes first, as in PixArtAlphaPipeline, and is conditioned on the empty-prompt embedding
    (its negative prompt ""). With guidance_scale == 1 only the conditional branch is run.
    """
    if guidance_scale == 1.0:
        return predict_eps(transformer, x_t, timesteps, prompt_embeds, prompt_attention_mask, added_cond_kwargs)
    batch_size = x_t.shape[0]
    if torch.is_tensor(timesteps) and timesteps.numel() > 1:
        timesteps = torch.cat([timesteps, timesteps])
    eps_both = predict_eps(
        transformer,
        torch.cat([x_t, x_t]),
        timesteps,
        torch.cat([negative_prompt_embeds, prompt_embeds]),
        torch.cat([negative_prompt_attention_mask, prompt_attention_mask]),
        _repeat_micro_conditions(added_cond_kwargs, 2),
    )
    eps_uncond, eps_cond = eps_both[:batch_size], eps_both[batch_size:]
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _alpha_sigma_at(alphas_cumprod: torch.Tensor, timestep: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of one timestep, 0-dim float32 tensors on `device`."""
    return alpha_sigma(alphas_cumprod, torch.tensor(int(timestep), device=device))


def scale_noise_to_conditioning_timestep(
    noise: torch.Tensor, alphas_cumprod: torch.Tensor, t_star: int
) -> torch.Tensor:
    """x_in = sigma_{t*} z: the noisy latent of t* whose signal is zero."""
    _, sigma_star = _alpha_sigma_at(alphas_cumprod, t_star, noise.device)
    return sigma_star * noise


def eps_to_x0(x_t: torch.Tensor, eps_hat: torch.Tensor, alphas_cumprod: torch.Tensor, t_star: int) -> torch.Tensor:
    """x0 = (x_t - sigma_t eps_hat) / alpha_t at a single timestep (DDPMScheduler's pred_original_sample)."""
    alpha, sigma = _alpha_sigma_at(alphas_cumprod, t_star, x_t.device)
    return (x_t - sigma * eps_hat) / alpha


def one_step_generate(
    transformer,
    noise: torch.Tensor,
    t_star: int,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """x0 = G_theta(z, c): the one-step generator, differentiable in the transformer's parameters.

    noise: z ~ N(0, I), (B, C, h, w), unscaled; returns the latent x0 of the same shape (VAE-scaled latent space).
    """
    x_in = scale_noise_to_conditioning_timestep(noise, alphas_cumprod, t_star).to(noise.dtype)
    eps_hat = predict_eps(transformer, x_in, t_star, prompt_embeds, prompt_attention_mask, added_cond_kwargs)
    return eps_to_x0(x_in, eps_hat, alphas_cumprod, t_star)
