"""The generator mapping (one step, and K steps of the same network) and the epsilon calls of PixArt transformers: the
one home of both.

The pipeline, the trainer, the benchmarks and the evaluation call these functions, so that the generator used in
training and the one users load can never drift apart.

One-step generator (SIM-DiT-600M form; EDM's iDDPM preconditioning with c_skip = 1, c_out = -sigma):
    x_in = sigma_{t*} * z,                 z ~ N(0, I)       (the noisy latent of t* with zero signal)
    eps_hat = transformer(x_in, t*, c)[:, :latent_channels]  (learned-sigma channels dropped)
    x0 = (x_in - sigma_{t*} * eps_hat) / alpha_{t*}

K-step generator (`few_step_generate`): the same network at K decreasing timesteps, each x0 re-noised with fresh
noise to the next timestep, the last x0 the sample; K = 1 is the one-step generator above.

Only torch is imported; the transformer is any module with PixArtTransformer2DModel's call signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedule import alpha_sigma, diffuse


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


def generator_step(
    transformer,
    x_t: torch.Tensor,
    timestep: int,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """One call of the generator: x0 = (x_t - sigma_t eps_hat(x_t, t, c)) / alpha_t at the timestep t."""
    eps_hat = predict_eps(transformer, x_t, timestep, prompt_embeds, prompt_attention_mask, added_cond_kwargs)
    return eps_to_x0(x_t, eps_hat, alphas_cumprod, timestep)


def few_step_generate(
    transformer,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    fresh_noise: Sequence[torch.Tensor] | Callable[[int], torch.Tensor] | None = None,
    graph_from_step: int = 0,
) -> torch.Tensor:
    """x0 = G_theta(z, c) in K = len(timesteps) calls of the same network at decreasing timesteps t_1 > ... > t_K:

        x_{t_1} = sigma_{t_1} z                                    (zero signal, as the one-step generator)
        x0_k = (x_{t_k} - sigma_{t_k} eps_hat(x_{t_k}, t_k, c)) / alpha_{t_k}
        x_{t_{k+1}} = alpha_{t_{k+1}} x0_k + sigma_{t_{k+1}} eps_{k+1}   (fresh noise eps_{k+1} ~ N(0, I))

    and the sample is x0_K. K = 1 is the one-step generator. This is LCM's multistep sampling (x0, then re-noised
    with fresh noise to the next timestep) without its boundary-condition blend, which is how a stock
    `PixArtAlphaPipeline` with `LCMScheduler` reproduces it (tested).

    noise: z, (B, C, h, w), unscaled. fresh_noise: eps_2 .. eps_K, as a sequence or a function of the step index
    k = 1 .. K - 1 (drawn when called, so a pipeline can draw them from its generator in order). graph_from_step:
    calls before this index run without autograd (backward simulation trains the last call only).
    """
    if len(timesteps) > 1 and fresh_noise is None:
        raise ValueError(f"{len(timesteps)} generator steps need fresh noise for the steps after the first.")
    grad = torch.is_grad_enabled()

    def step(k: int, x_t: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad and k >= graph_from_step):
            return generator_step(
                transformer, x_t, timesteps[k], alphas_cumprod, prompt_embeds, prompt_attention_mask, added_cond_kwargs
            )

    x0 = step(0, scale_noise_to_conditioning_timestep(noise, alphas_cumprod, timesteps[0]).to(noise.dtype))
    for k in range(1, len(timesteps)):
        eps = fresh_noise(k) if callable(fresh_noise) else fresh_noise[k - 1]
        t_next = torch.full((x0.shape[0],), int(timesteps[k]), device=x0.device, dtype=torch.long)
        x0 = step(k, diffuse(x0, t_next, eps, alphas_cumprod)[0])
    return x0


def backward_simulation(
    transformer,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None,
    fresh_noise: torch.Tensor,
    trained_steps: torch.Tensor,
) -> torch.Tensor:
    """The K-step generator's output at the call each sample trains (DMD2's backward simulation): sample i runs
    calls 1 .. k_i of `few_step_generate` without autograd and call k_i + 1 with it, k_i = trained_steps[i].

    fresh_noise: (B, K - 1, C, h, w), sample i's eps_2 .. eps_K; trained_steps: (B,) in [0, K). Returns (B, C, h, w),
    each sample's x0_{k_i + 1}, carrying the graph of its last call only (under an enabled autograd). Samples that
    share a call run in one batched forward per call and per kind (simulated or trained).
    """
    grad, steps = torch.is_grad_enabled(), trained_steps.tolist()
    outputs: list[torch.Tensor | None] = [None] * noise.shape[0]
    x_t = scale_noise_to_conditioning_timestep(noise, alphas_cumprod, timesteps[0]).to(noise.dtype)
    for k, timestep in enumerate(timesteps):
        simulated = [i for i, last in enumerate(steps) if last > k]
        trained = [i for i, last in enumerate(steps) if last == k]
        for rows, with_graph in ((trained, True), (simulated, False)):
            if not rows:
                continue
            index = torch.tensor(rows, device=noise.device)
            with torch.set_grad_enabled(grad and with_graph):
                x0 = generator_step(
                    transformer,
                    x_t[index],
                    timestep,
                    alphas_cumprod,
                    prompt_embeds[index],
                    prompt_attention_mask[index],
                    _select_rows(added_cond_kwargs, index),
                )
            if with_graph:
                for j, i in enumerate(rows):
                    outputs[i] = x0[j]
            else:  # re-noised to the next call's timestep
                t_next = torch.full((len(rows),), int(timesteps[k + 1]), device=x0.device, dtype=torch.long)
                x_t = x_t.clone()
                x_t[index] = diffuse(x0, t_next, fresh_noise[index, k], alphas_cumprod)[0].to(x_t.dtype)
    return torch.stack(outputs)


def _select_rows(added_cond_kwargs: dict | None, index: torch.Tensor) -> dict | None:
    if added_cond_kwargs is None:
        return None
    return {k: (v[index] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in added_cond_kwargs.items()}


def one_step_generate(
    transformer,
    noise: torch.Tensor,
    t_star: int,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """x0 = G_theta(z, c): the one-step generator (`few_step_generate` at the single timestep t*), differentiable in
    the transformer's parameters.

    noise: z ~ N(0, I), (B, C, h, w), unscaled; returns the latent x0 of the same shape (VAE-scaled latent space).
    """
    return few_step_generate(
        transformer, noise, [t_star], alphas_cumprod, prompt_embeds, prompt_attention_mask, added_cond_kwargs
    )


def default_generator_timesteps(t_star: int, num_steps: int) -> list[int]:
    """The K-step generator's timesteps by default: t* (the one-step generator's) first, then evenly spaced down to
    t* / K: K = 2 gives [440, 220], K = 4 [440, 330, 220, 110] for PixArt's t* = 440."""
    if num_steps < 1:
        raise ValueError(f"the number of generator steps must be >= 1, got {num_steps}.")
    return [round(t_star * (num_steps - k) / num_steps) for k in range(num_steps)]


def check_generator_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """The timesteps as ints, or ValueError: at least one, strictly decreasing, within [1, num_train_timesteps - 1]."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("give at least one generator timestep.")
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"generator timesteps must be strictly decreasing, got {timesteps}.")
    if timesteps[-1] < 1 or timesteps[0] > num_train_timesteps - 1:
        raise ValueError(f"generator timesteps must lie in [1, {num_train_timesteps - 1}], got {timesteps}.")
    return timesteps
