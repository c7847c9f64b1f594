"""Samplers of a `GaussianMixtureWorld`, all started from the same noise: any pipeline (a SIMOneStepPipeline being
distilled, a PixArtAlphaPipeline teacher), the exact-epsilon oracle, and the teacher with its DPM-Solver++.

Caption i is always sampled from a CPU generator seeded `seed + i` (`initial_noise`), so samplers compared at one seed
see the same noise. diffusers is imported by the pipelines passed in, not here.
"""

from __future__ import annotations

import torch

from ..sampling import dpm_solver_sample, teacher_ode_sample
from .metrics import evaluate_pipeline_latents
from .world import GaussianMixtureWorld


def sample_pipeline_latents(
    pipe, world: GaussianMixtureWorld, num_samples: int, seed: int = 0, **call_kwargs
) -> list[torch.Tensor]:
    """`num_samples` latents per caption from a SIMOneStepPipeline or PixArtAlphaPipeline, output_type="latent".

    Caption i is sampled in one call with a CPU generator seeded `seed + i`, so every sampler starts from the same
    noise. `call_kwargs` go to the pipeline (num_inference_steps, guidance_scale, ...).
    """
    call_kwargs.setdefault("use_resolution_binning", False)  # the tiny teacher's sample_size has no PixArt bin
    pipe.set_progress_bar_config(disable=True)
    latents = []
    for caption_idx, caption in enumerate(world.captions):
        generator = torch.Generator().manual_seed(seed + caption_idx)
        out = pipe(
            prompt=caption, num_images_per_prompt=num_samples, generator=generator, output_type="latent", **call_kwargs
        )
        latents.append(out.images.detach().float().cpu())
    return latents


def evaluate_pipeline(pipe, world: GaussianMixtureWorld, num_samples: int = 256, seed: int = 0, **call_kwargs) -> dict:
    """`evaluate_pipeline_latents` of `sample_pipeline_latents`: e.g. a SIMOneStepPipeline being distilled."""
    return evaluate_pipeline_latents(world, sample_pipeline_latents(pipe, world, num_samples, seed, **call_kwargs))


def initial_noise(world, num_samples, seed, caption_idx, device="cpu"):
    """The noise z ~ N(0, I) that `sample_pipeline_latents` (and so every sampler here) starts caption `caption_idx`
    from: what PixArtAlphaPipeline.prepare_latents draws from a CPU generator seeded seed + caption_idx."""
    generator = torch.Generator().manual_seed(seed + caption_idx)
    return torch.randn((num_samples, *world.latent_shape), generator=generator).to(device)


def sample_exact_latents(
    world: GaussianMixtureWorld,
    scheduler,
    num_samples: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The exact-epsilon oracle: `scheduler`'s sampler (e.g. the teacher's DPM-Solver++) driven by eps*."""
    alphas_cumprod = scheduler.alphas_cumprod
    latents = []
    for caption_idx in range(world.num_captions):
        noise = initial_noise(world, num_samples, seed, caption_idx)

        def eps_fn(x_t, t, caption_idx=caption_idx):
            return world.guided_exact_eps(x_t, int(t), caption_idx, guidance_scale, alphas_cumprod)

        latents.append(dpm_solver_sample(eps_fn, scheduler, noise, num_inference_steps))
    return latents


def sample_teacher_latents(
    pipe,
    world: GaussianMixtureWorld,
    num_samples: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    seed: int = 0,
    use_pipeline: bool | None = None,
) -> list[torch.Tensor]:
    """A PixArtAlphaPipeline teacher with its own scheduler (DPM-Solver++), seeded as `sample_pipeline_latents`.

    PixArtAlphaPipeline cannot take a single DPM-Solver++ step (with num_inference_steps == 1 it reads a second
    output of `scheduler.step`, which only DDPM-like schedulers return), so by default one step runs the same
    solution outside the pipeline (`sim_diffusers.sampling.teacher_ode_sample` with the pipeline's prompt
    embeddings, the trainer's regression target); more steps call the pipeline.
    """
    if use_pipeline is None:
        use_pipeline = num_inference_steps > 1
    if use_pipeline:
        return sample_pipeline_latents(
            pipe, world, num_samples, seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
    device = pipe.transformer.device
    latents = []
    for caption_idx, caption in enumerate(world.captions):
        # Both branches are encoded whatever the scale: at guidance 1 teacher_ode_sample runs only the conditional one.
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            caption,
            True,
            negative_prompt="",
            device=device,
            clean_caption=True,
            num_images_per_prompt=num_samples,
        )
        noise = initial_noise(world, num_samples, seed, caption_idx, device)
        latents.append(
            teacher_ode_sample(
                pipe.transformer,
                pipe.scheduler,
                noise,
                embeds,
                mask,
                negative_embeds,
                negative_mask,
                guidance_scale,
                num_inference_steps,
            )
            .float()
            .cpu()
        )
    return latents
