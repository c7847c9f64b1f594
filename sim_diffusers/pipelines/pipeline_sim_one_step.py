# Copyright 2026 The sim_diffusers authors. Apache-2.0.
# Absolute imports: diffusers copies this single file when it is loaded as a `custom_pipeline`.
"""SIMOneStepPipeline: one-step text-to-image generation with a SIM-distilled PixArt-alpha generator."""

from __future__ import annotations

import copy
import os

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from sim_diffusers.generator import micro_conditions, one_step_generate
from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, check_timestep, timestep_for_ve_sigma

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from sim_diffusers import SIMOneStepPipeline

        >>> pipe = SIMOneStepPipeline.from_pretrained("path/or/hub-id-of-a-sim-model", dtype=torch.bfloat16)
        >>> pipe = pipe.to("cuda")
        >>> image = pipe("A small cactus with a happy face in the Sahara desert.").images[0]
        ```
"""

# PixArt-alpha's resolution bins, keyed by the transformer's sample_size (latent side of its training resolution).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ASPECT_RATIO_BINS = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


def vae_scale_factor_of(vae) -> int:
    """Pixel-to-latent downsampling of an AutoencoderKL (block_out_channels) or AutoencoderTiny (decoder blocks)."""
    if vae is None:
        return 8
    blocks = vae.config.get("block_out_channels") or vae.config.get("decoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


class SIMOneStepPipeline(DiffusionPipeline):
    r"""
    One-step text-to-image generation with a PixArt-alpha transformer distilled by Score Implicit Matching.

    The generator maps noise z ~ N(0, I) to a latent in a single transformer call at the conditioning timestep t*
    (see `sim_diffusers.generator.one_step_generate`). For any transformer weights this is exactly
    `PixArtAlphaPipeline` with `DDPMScheduler(clip_sample=False)`, `timesteps=[t*]`, `guidance_scale=1` and
    `latents = sqrt(1 - alphabar[t*]) * z`.

    Args:
        tokenizer ([`T5Tokenizer`]): tokenizer of the T5 text encoder.
        text_encoder ([`T5EncoderModel`]): frozen T5-v1.1-XXL encoder (or any T5 encoder of the teacher).
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): decoder from latents to images.
        transformer ([`PixArtTransformer2DModel`]): the one-step generator.
        scheduler ([`DDPMScheduler`]): carries the teacher's noise schedule (alphabar); it takes no step.
        conditioning_timestep (`int`, *optional*): t*, the timestep the generator is conditioned on. Fixed at
            training time; defaults to the timestep whose VE noise level is nearest to 2.5 (t = 440 for PixArt).
    """

    _optional_components = ["tokenizer", "text_encoder"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    # Prompt handling is PixArt-alpha's own (lower-casing, optional caption cleaning, 120-token T5 padding), so that
    # the trainer, which encodes captions through this pipeline, and inference can never tokenise differently.
    bad_punct_regex = PixArtAlphaPipeline.bad_punct_regex
    encode_prompt = PixArtAlphaPipeline.encode_prompt
    _text_preprocessing = PixArtAlphaPipeline._text_preprocessing
    _clean_caption = PixArtAlphaPipeline._clean_caption

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, conditioning_timestep: int | None = None):
        super().__init__()
        if not isinstance(transformer, PixArtTransformer2DModel):
            raise ValueError(
                "SIMOneStepPipeline needs a PixArtTransformer2DModel as `transformer`, got "
                f"{type(transformer).__name__}."
            )
        alphas_cumprod = alphas_cumprod_of(scheduler)
        if conditioning_timestep is None:
            conditioning_timestep = timestep_for_ve_sigma(alphas_cumprod, DEFAULT_SIGMA_INIT)
        conditioning_timestep = check_timestep(alphas_cumprod, conditioning_timestep)
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.register_to_config(conditioning_timestep=conditioning_timestep)
        self.vae_scale_factor = vae_scale_factor_of(vae)
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def conditioning_timestep(self) -> int:
        return self.config.conditioning_timestep

    @classmethod
    def from_teacher(
        cls,
        teacher: str | os.PathLike | PixArtAlphaPipeline,
        conditioning_timestep: int | None = None,
        **kwargs,
    ) -> "SIMOneStepPipeline":
        """A one-step pipeline whose generator starts as a copy of a PixArt-alpha teacher.

        Args:
            teacher: a Hub id (e.g. `"PixArt-alpha/PixArt-XL-2-512x512"`), a local pipeline folder, or a loaded
                `PixArtAlphaPipeline`. A loaded teacher is left untouched: its transformer is deep-copied, the
                frozen tokenizer, text encoder and VAE are shared.
            conditioning_timestep: t* (default: VE sigma 2.5, i.e. t = 440 for PixArt's schedule).
            kwargs: passed to `PixArtAlphaPipeline.from_pretrained` when `teacher` is a path or Hub id
                (`revision`, `variant`, `dtype`, ...).
        """
        if isinstance(teacher, (str, os.PathLike)):
            teacher = PixArtAlphaPipeline.from_pretrained(teacher, **kwargs)
            transformer = teacher.transformer
        elif isinstance(teacher, DiffusionPipeline):
            if kwargs:
                raise ValueError(f"Loading options {sorted(kwargs)} only apply when the teacher is a path or Hub id.")
            transformer = copy.deepcopy(teacher.transformer)
        else:
            raise ValueError(f"`teacher` must be a Hub id, a folder or a PixArtAlphaPipeline, got {type(teacher)}.")
        if not isinstance(teacher.transformer, PixArtTransformer2DModel):
            raise ValueError(
                f"The teacher's transformer is a {type(teacher.transformer).__name__}, not a PixArtTransformer2DModel:"
                " only PixArt-alpha teachers are supported."
            )
        # The one-step pipeline only reads the schedule; DDPM is the scheduler whose x0 prediction it reproduces.
        scheduler = DDPMScheduler.from_config(teacher.scheduler.config, clip_sample=False)
        return cls(
            tokenizer=teacher.tokenizer,
            text_encoder=teacher.text_encoder,
            vae=teacher.vae,
            transformer=transformer,
            scheduler=scheduler,
            conditioning_timestep=conditioning_timestep,
        )

    def check_inputs(
        self, prompt, height, width, prompt_embeds, prompt_attention_mask, generator, batch_size, output_type
    ):
        patch = self.vae_scale_factor * self.transformer.config.patch_size
        if height % patch != 0 or width % patch != 0:
            raise ValueError(
                f"`height` and `width` must be divisible by {patch} (VAE factor {self.vae_scale_factor} x patch size "
                f"{self.transformer.config.patch_size}), got {height} x {width}."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass one of `prompt` or `prompt_embeds`.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("`prompt` is an empty list: give at least one prompt.")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("`prompt_attention_mask` is required with `prompt_embeds`.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images (batch size x "
                "num_images_per_prompt): give one generator per image, or a single generator."
            )

    def prepare_noise(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """z ~ N(0, I) of the latent shape; `latents`, when given, is z itself (unscaled)."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=dtype)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 120,
    ):
        r"""
        Generate images in one transformer evaluation.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds` instead.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            height, width (`int`, *optional*): image size in pixels; defaults to the transformer's training size.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image.
            latents (`torch.Tensor`, *optional*): the input noise z ~ N(0, I), shape (B, C, H/8, W/8), unscaled;
                the pipeline scales it to the conditioning timestep itself.
            prompt_embeds, prompt_attention_mask (`torch.Tensor`, *optional*): precomputed T5 embeddings (B, L, D)
                and their mask (B, L), as returned by `encode_prompt`; no text encoder is then needed.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 in the VAE's scaled
                latent space, before decoding).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` rather than a tuple.
            clean_caption (`bool`, defaults to `True`): clean captions as PixArt-alpha does (needs `beautifulsoup4`
                and `ftfy`; otherwise prompts are only lower-cased and stripped, with a warning).
            use_resolution_binning (`bool`, defaults to `True`): map height/width to the nearest PixArt aspect-ratio
                bin and resize the result back. Applies to transformers of sample_size 32, 64 and 128 (256, 512 and
                1024 px models); others generate at the requested size.
            max_sequence_length (`int`, defaults to 120): T5 token length.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Resolve the size (and its PixArt bin), then check inputs
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor
        orig_height, orig_width = height, width
        aspect_ratio_bin = ASPECT_RATIO_BINS.get(self.transformer.config.sample_size)
        use_resolution_binning = use_resolution_binning and aspect_ratio_bin is not None
        if use_resolution_binning:
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=aspect_ratio_bin)

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0] if prompt_embeds is not None else 0
        num_images = batch_size * num_images_per_prompt
        self.check_inputs(
            prompt, height, width, prompt_embeds, prompt_attention_mask, generator, num_images, output_type
        )
        device = self._execution_device

        # 2. Encode the prompt (no guidance: the one-step generator was distilled from the guided teacher)
        prompt_embeds, prompt_attention_mask, _, _ = self.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
        )

        # 3. Input noise z
        noise = self.prepare_noise(num_images, height, width, prompt_embeds.dtype, device, generator, latents)

        # 4. One-step generation x0 = G(z, c)
        added_cond_kwargs = micro_conditions(self.transformer, num_images, height, width, device, prompt_embeds.dtype)
        x0 = one_step_generate(
            self.transformer,
            noise.to(self.transformer.dtype),
            self.conditioning_timestep,
            self.scheduler.alphas_cumprod,
            prompt_embeds.to(self.transformer.dtype),
            prompt_attention_mask,
            added_cond_kwargs,
        )

        # 5. Decode
        if output_type == "latent":
            image = x0
        else:
            image = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                image = self.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
            image = self.image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
