# Copyright 2026 The sim_diffusers authors. Apache-2.0.
"""SIMOneStepPipeline: one-step text-to-image generation with a PixArt-alpha or PixArt-Σ transformer distilled by SIM.

This module, and the sibling modules it imports, are also the code a saved SIM folder carries for stock diffusers:
`save_pretrained` copies these files next to model_index.json, which names the class as
["pipeline_sim_one_step", "SIMOneStepPipeline"], so that `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` loads it without this package installed. diffusers copies a folder's pipeline module and the
files of its single-dot relative imports (a local folder: only those the pipeline module itself names) into its
module cache, so this module imports only torch, diffusers, transformers and, relatively and directly, every sibling
it needs (`generator` needs `schedule`, which is imported here too).
"""

import ast
import copy
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDPMScheduler,
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import T5EncoderModel, T5Tokenizer

from .generator import check_generator_timesteps, few_step_generate, micro_conditions
from .schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, check_timestep, timestep_for_ve_sigma
from .teachers import PIXART_ALPHA, family_of_pipeline, load_teacher_pipeline

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

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# PixArt's resolution bins, keyed by the transformer's sample_size (the latent side of its training resolution). The
# alpha and Σ pipelines pick the same bin for the sizes both have; only PixArt-Σ has a 2K (sample_size 256) model.
ASPECT_RATIO_BINS = {
    256: ASPECT_RATIO_2048_BIN,
    128: ASPECT_RATIO_1024_BIN,
    64: ASPECT_RATIO_512_BIN,
    32: ASPECT_RATIO_256_BIN,
}
# The name model_index.json gives this module: diffusers imports `<name>.py` from the folder.
MODULE_NAME = Path(__file__).stem


def vae_scale_factor_of(vae) -> int:
    """Pixel-to-latent downsampling of an AutoencoderKL (block_out_channels) or AutoencoderTiny (decoder blocks)."""
    if vae is None:
        return 8
    blocks = vae.config.get("block_out_channels") or vae.config.get("decoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def pipeline_code_files() -> list[Path]:
    """This module and the sibling modules it imports relatively: the code a saved folder carries.

    Read from the source itself, so the list cannot drift from the imports. Works from the package and from the copy
    diffusers imports out of its module cache (the siblings lie next to it there too).
    """
    here = Path(__file__).resolve()
    tree = ast.parse(here.read_text(encoding="utf-8"))
    siblings = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    return [here] + [here.with_name(f"{name}.py") for name in sorted(siblings)]


class SIMOneStepPipeline(DiffusionPipeline):
    r"""
    One-step text-to-image generation with a PixArt transformer distilled by Score Implicit Matching.

    The generator maps noise z ~ N(0, I) to a latent in a single transformer call at the conditioning timestep t*
    (see `sim_diffusers.generator.one_step_generate`). For any transformer weights this is exactly the teacher
    family's own pipeline (`PixArtAlphaPipeline` or `PixArtSigmaPipeline`) with `DDPMScheduler(clip_sample=False)`,
    `timesteps=[t*]`, `guidance_scale=1` and `latents = sqrt(1 - alphabar[t*]) * z`.

    Every component may be `None` (as in diffusers pipelines): a pipeline holding only the text encoder can
    `encode_prompt`, one without it takes `prompt_embeds`. A missing component is reported where it is needed.

    Args:
        tokenizer ([`T5Tokenizer`]): tokenizer of the T5 text encoder.
        text_encoder ([`T5EncoderModel`]): the teacher's frozen T5-v1.1-XXL encoder.
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): decoder from latents to images (the teacher's: the SD VAE for
            PixArt-alpha, the SDXL VAE for PixArt-Σ; its `scaling_factor` is read from its config).
        transformer ([`PixArtTransformer2DModel`]): the one-step generator.
        scheduler ([`SchedulerMixin`]): carries the teacher's noise schedule (`alphas_cumprod`); it takes no step.
        conditioning_timestep (`int`, *optional*): t*, the timestep the generator is conditioned on. Fixed at
            training time; defaults to the timestep whose VE noise level is nearest to 2.5 (t = 440 for PixArt).
        max_sequence_length (`int`, *optional*): T5 tokens per prompt, the length the generator was trained with;
            defaults to PixArt-alpha's 120 (`from_teacher` and `from_pipe` set PixArt-Σ's 300 for Σ teachers).
        generator_timesteps (`list[int]`, *optional*): the K decreasing timesteps of a K-step generator (the same
            network called K times, each x0 re-noised with fresh noise to the next timestep,
            `sim_diffusers.generator.few_step_generate`); the first is t*. Defaults to `[conditioning_timestep]`: the
            one-step generator.
    """

    _optional_components = ["tokenizer", "text_encoder"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    # Prompt handling is PixArt's own (lower-casing, optional caption cleaning, T5 padding), so that the trainer,
    # which encodes captions through the teacher's pipeline, and inference can never tokenise differently.
    bad_punct_regex = PixArtAlphaPipeline.bad_punct_regex
    _text_preprocessing = PixArtAlphaPipeline._text_preprocessing
    _clean_caption = PixArtAlphaPipeline._clean_caption

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKL | AutoencoderTiny,
        transformer: PixArtTransformer2DModel,
        scheduler: SchedulerMixin,
        conditioning_timestep: int | None = None,
        max_sequence_length: int | None = None,
        generator_timesteps: list[int] | None = None,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        if generator_timesteps is not None:
            generator_timesteps = [int(t) for t in generator_timesteps]
            if conditioning_timestep is not None and generator_timesteps[:1] != [int(conditioning_timestep)]:
                raise ValueError(
                    f"generator_timesteps {generator_timesteps} must start at conditioning_timestep "
                    f"{conditioning_timestep}."
                )
            conditioning_timestep = generator_timesteps[0] if generator_timesteps else None
        if scheduler is not None:  # without one, t* is kept as given and the schedule is asked for at call time
            alphas_cumprod = alphas_cumprod_of(scheduler)
            if conditioning_timestep is None:
                conditioning_timestep = timestep_for_ve_sigma(alphas_cumprod, DEFAULT_SIGMA_INIT)
            conditioning_timestep = check_timestep(alphas_cumprod, conditioning_timestep)
            if generator_timesteps is not None:
                generator_timesteps = check_generator_timesteps(generator_timesteps, alphas_cumprod.shape[0])
        if generator_timesteps is None and conditioning_timestep is not None:
            generator_timesteps = [int(conditioning_timestep)]
        if max_sequence_length is None:
            max_sequence_length = PIXART_ALPHA.max_sequence_length  # folders saved before PixArt-Σ support
        if int(max_sequence_length) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}.")
        self.register_to_config(
            conditioning_timestep=conditioning_timestep,
            max_sequence_length=int(max_sequence_length),
            generator_timesteps=generator_timesteps,
        )
        self.vae_scale_factor = vae_scale_factor_of(vae)
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def conditioning_timestep(self) -> int | None:
        return self.config.conditioning_timestep

    @property
    def generator_timesteps(self) -> list[int] | None:
        """The timesteps of the generator's calls (one for a one-step generator; folders saved before K-step
        generators existed have only `conditioning_timestep`)."""
        timesteps = self.config.get("generator_timesteps")
        if timesteps is None and self.conditioning_timestep is not None:
            return [self.conditioning_timestep]
        return None if timesteps is None else list(timesteps)

    @classmethod
    def from_teacher(
        cls,
        teacher: str | os.PathLike | DiffusionPipeline,
        conditioning_timestep: int | None = None,
        max_sequence_length: int | None = None,
        generator_timesteps: list[int] | None = None,
        **kwargs,
    ) -> "SIMOneStepPipeline":
        """A one-step pipeline whose generator starts as a copy of a PixArt-alpha or PixArt-Σ teacher.

        Args:
            teacher: a Hub id (e.g. `"PixArt-alpha/PixArt-XL-2-512x512"`, `"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"`),
                a local pipeline folder (its family is read from its model_index.json), or a loaded
                `PixArtAlphaPipeline` / `PixArtSigmaPipeline`. A loaded teacher is left untouched: its transformer is
                deep-copied, the frozen tokenizer, text encoder and VAE are shared.
            conditioning_timestep: t* (default: VE sigma 2.5, i.e. t = 440 for PixArt's schedule).
            max_sequence_length: T5 tokens per prompt (default: the teacher family's, 120 or 300).
            generator_timesteps: the K timesteps of a K-step generator, starting at t* (default: one step at t*).
            kwargs: passed to the teacher pipeline's `from_pretrained` when `teacher` is a path or Hub id
                (`revision`, `variant`, `dtype`, ...).
        """
        if isinstance(teacher, (str, os.PathLike)):
            teacher = load_teacher_pipeline(teacher, **kwargs)
            copy_transformer = False
        elif isinstance(teacher, DiffusionPipeline):
            if kwargs:
                raise ValueError(f"Loading options {sorted(kwargs)} only apply when the teacher is a path or Hub id.")
            copy_transformer = True
        else:
            raise ValueError(
                f"`teacher` must be a Hub id, a folder or a PixArt pipeline, got {type(teacher).__name__}."
            )
        family = family_of_pipeline(teacher)
        if family is None:
            raise ValueError(
                f"The teacher is a {type(teacher).__name__}, not a PixArtAlphaPipeline or PixArtSigmaPipeline."
            )
        if not isinstance(teacher.transformer, PixArtTransformer2DModel):
            raise ValueError(
                f"The teacher's transformer is a {type(teacher.transformer).__name__}, not a PixArtTransformer2DModel."
            )
        # The one-step pipeline only reads the schedule; DDPM is the scheduler whose x0 prediction it reproduces.
        scheduler = DDPMScheduler.from_config(teacher.scheduler.config, clip_sample=False)
        return cls(
            tokenizer=teacher.tokenizer,
            text_encoder=teacher.text_encoder,
            vae=teacher.vae,
            transformer=copy.deepcopy(teacher.transformer) if copy_transformer else teacher.transformer,
            scheduler=scheduler,
            conditioning_timestep=conditioning_timestep,
            max_sequence_length=family.max_sequence_length if max_sequence_length is None else max_sequence_length,
            generator_timesteps=generator_timesteps,
        )

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "SIMOneStepPipeline":
        """diffusers' `from_pipe` (components shared, not copied); from a PixArt-alpha or PixArt-Σ pipeline the T5
        length defaults to that family's (its scheduler is kept: only its `alphas_cumprod` is read)."""
        carried = {"max_sequence_length", "_max_sequence_length"} & set(pipeline.config)  # a SIM pipeline's own
        if "max_sequence_length" not in kwargs and not carried:
            family = family_of_pipeline(pipeline)
            if family is not None:
                kwargs["max_sequence_length"] = family.max_sequence_length
        return super().from_pipe(pipeline, **kwargs)

    # Saving and loading. A saved folder names this class as [module, class] and carries this module's code, for
    # stock diffusers; loading through this class must use the installed class and run nothing from the folder.

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        config["_class_name"] = [MODULE_NAME, SIMOneStepPipeline.__name__]  # the class the carried module defines
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """model_index.json and, next to it, the code that loads it: this module and the sibling modules it imports,
        byte for byte (before the upload, when `push_to_hub`)."""
        os.makedirs(save_directory, exist_ok=True)
        for path in pipeline_code_files():
            shutil.copyfile(path, os.path.join(save_directory, path.name))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # Every config this class reads (from_pretrained, download) passes here. diffusers would import the folder's
        # copy of the code for a [module, class] name (refusing without trust_remote_code); this class is that code.
        config = super()._dict_from_json_file(json_file)
        if config.get("_class_name") == [MODULE_NAME, SIMOneStepPipeline.__name__]:
            config["_class_name"] = cls.__name__
        return config

    def encode_prompt(
        self,
        prompt: str | list[str],
        do_classifier_free_guidance: bool = True,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int | None = None,
        **kwargs,
    ):
        r"""
        T5 embeddings of the prompt, exactly as the teacher's pipeline computes them (PixArt-alpha and PixArt-Σ share
        this code; they differ only in the length, which defaults here to the pipeline's `max_sequence_length`).

        Works on a pipeline that holds only the tokenizer and text encoder (`transformer=None, vae=None`), the first
        half of the low-memory recipe. Arguments and return value are `PixArtAlphaPipeline.encode_prompt`'s:
        `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`, shapes
        (B * num_images_per_prompt, L, D) and (B * num_images_per_prompt, L); the negative ones are None without
        classifier-free guidance (the one-step generator never uses them).
        """
        if max_sequence_length is None:
            max_sequence_length = self.config.max_sequence_length
        needs_t5 = prompt_embeds is None or (do_classifier_free_guidance and negative_prompt_embeds is None)
        if needs_t5 and (self.tokenizer is None or self.text_encoder is None):
            raise ValueError(
                "SIMOneStepPipeline needs a `tokenizer` and a `text_encoder` to encode prompts: load them, or pass "
                "`prompt_embeds` and `prompt_attention_mask`."
            )
        return PixArtAlphaPipeline.encode_prompt(
            self,
            prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
            **kwargs,
        )

    def check_components(self, output_type):
        """The components a call needs, before any of them runs (the text side is checked by `encode_prompt`)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(self.transformer, PixArtTransformer2DModel):
            raise ValueError(
                "SIMOneStepPipeline needs a PixArtTransformer2DModel as `transformer`, got "
                f"{type(self.transformer).__name__}."
            )
        if self.scheduler is None:
            raise ValueError("SIMOneStepPipeline needs a `scheduler` carrying the teacher's noise schedule.")
        if self.conditioning_timestep is None:
            raise ValueError("SIMOneStepPipeline was built without a scheduler, so without a `conditioning_timestep`.")
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                'SIMOneStepPipeline needs a `vae` to decode images: load it, or pass output_type="latent".'
            )

    def check_inputs(self, prompt, height, width, prompt_embeds, prompt_attention_mask, generator, batch_size):
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
        num_inference_steps: int | None = None,
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
        max_sequence_length: int | None = None,
    ):
        r"""
        Generate images in one transformer evaluation (a K-step generator: in up to K).

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds` instead.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            num_inference_steps (`int`, *optional*): generator calls, 1 to the K the generator was trained with
                (default K): the first `num_inference_steps` of its `generator_timesteps`. Every call's output was
                trained to be a sample (backward simulation), so fewer calls give a valid, less refined sample.
            height, width (`int`, *optional*): image size in pixels; defaults to the transformer's training size.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image;
                it draws z (unless `latents` is given), then the fresh noise of each call after the first.
            latents (`torch.Tensor`, *optional*): the input noise z ~ N(0, I), shape (B, C, H/8, W/8), unscaled;
                the pipeline scales it to the conditioning timestep itself.
            prompt_embeds, prompt_attention_mask (`torch.Tensor`, *optional*): precomputed T5 embeddings (B, L, D)
                and their mask (B, L), as returned by `encode_prompt`; no text encoder is then needed.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (x0 in the VAE's scaled
                latent space, before decoding; no VAE is then needed).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` rather than a tuple.
            clean_caption (`bool`, defaults to `True`): clean captions as PixArt does (needs `beautifulsoup4` and
                `ftfy`; otherwise prompts are only lower-cased and stripped, with a warning).
            use_resolution_binning (`bool`, defaults to `True`): map height/width to the nearest PixArt aspect-ratio
                bin and resize the result back. Applies to transformers of sample_size 32, 64, 128 and 256 (256, 512,
                1024 and 2048 px models); others generate at the requested size.
            max_sequence_length (`int`, *optional*): T5 tokens per prompt; defaults to the pipeline's (the length the
                generator was trained with: 120 for PixArt-alpha teachers, 300 for PixArt-Σ).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs (the components first: the default size is the transformer's), resolving the size and its bin
        self.check_components(output_type)
        timesteps = self.generator_timesteps
        if num_inference_steps is not None:
            if not 1 <= num_inference_steps <= len(timesteps):
                raise ValueError(
                    f"`num_inference_steps` must be between 1 and {len(timesteps)}, the generator's trained steps "
                    f"{timesteps}; got {num_inference_steps}."
                )
            timesteps = timesteps[:num_inference_steps]
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
        self.check_inputs(prompt, height, width, prompt_embeds, prompt_attention_mask, generator, num_images)
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

        # 4. Generation x0 = G(z, c): one call at t*, or K calls with fresh noise drawn from `generator` in between
        added_cond_kwargs = micro_conditions(self.transformer, num_images, height, width, device, prompt_embeds.dtype)
        dtype = self.transformer.dtype
        x0 = few_step_generate(
            self.transformer,
            noise.to(dtype),
            timesteps,
            self.scheduler.alphas_cumprod,
            prompt_embeds.to(dtype),
            prompt_attention_mask,
            added_cond_kwargs,
            fresh_noise=lambda k: randn_tensor(noise.shape, generator=generator, device=device, dtype=dtype),
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
