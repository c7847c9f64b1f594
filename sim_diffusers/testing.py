"""Tiny, offline, seeded PixArt-alpha and PixArt-Σ pipelines with the real Hub layout, for tests, demos, benchmarks.

Nothing here downloads anything: the T5 tokenizer is built from an in-memory vocabulary, and the T5 encoder, VAE and
PixArt transformer are randomly initialised from a seed. `build_tiny_pixart_pipeline(path)` writes a folder that
`PixArtAlphaPipeline.from_pretrained(path)` (and our trainer's `--pretrained_model_name_or_path`) accept exactly as
they accept `PixArt-alpha/PixArt-XL-2-512x512`; `build_tiny_pixart_sigma_pipeline(path)` one laid out as
`PixArt-alpha/PixArt-Sigma-XL-2-1024-MS` (PixArtSigmaPipeline, a 300-token tokenizer, an SDXL-style VAE, the
transformer named Transformer2DModel as the published Σ repositories name it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Words first (cheap pieces), then single characters so that any ASCII text still tokenises.
TINY_VOCABULARY_WORDS = (
    "a an the of in on at with and by to is photo picture painting drawing render close up view "
    "red green blue yellow black white orange purple pink brown gray golden silver "
    "cat dog bird fish horse cow owl fox bear rabbit tree house car boat flower mountain river lake city "
    "sky sun moon star road forest beach field street garden castle bridge "
    "small big tiny huge bright dark old new happy sitting standing flying running sleeping "
    "night day morning evening winter summer snow rain cloud sunset portrait landscape "
    "circle square triangle stripe dot pattern"
).split()
TINY_VOCABULARY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()")

TINY_T5_DIM = 32
TINY_MAX_SEQUENCE_LENGTH = 120  # PixArt-alpha's
TINY_SIGMA_MAX_SEQUENCE_LENGTH = 300  # PixArt-Σ's
# The VAE latents' scaling factors: SD's VAE (PixArt-alpha) and SDXL's (PixArt-Σ).
SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025


def tiny_t5_tokenizer(model_max_length: int = TINY_MAX_SEQUENCE_LENGTH):
    """A Unigram T5 tokenizer over TINY_VOCABULARY (pad=0, eos=1, unk=2 as in T5)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -2.0) for word in TINY_VOCABULARY_WORDS]
    vocab += [("\u2581", -4.0)] + [(char, -8.0) for char in TINY_VOCABULARY_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = TINY_T5_DIM):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(scaling_factor: float = SD_VAE_SCALING_FACTOR, **overrides):
    """A 4-channel AutoencoderKL with the SD VAE's x8 downsampling (and by default its scaling factor), a few thousand
    parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        **overrides,
    ).eval()


def tiny_transformer_config(micro_conditions: bool = False, **overrides) -> dict:
    """Config of a tiny PixArtTransformer2DModel shaped like PixArt-XL-2 (learned sigma, ada_norm_single).

    micro_conditions=False mimics PixArt-XL-2-512x512 (sample_size 64 in the real model); True mimics
    PixArt-XL-2-1024-MS: sample_size 128, interpolation_scale 2 and resolution/aspect-ratio conditioning, which
    PixArtAlphaPipeline switches on by sample_size == 128.
    """
    config = dict(
        num_attention_heads=2,
        attention_head_dim=12,  # inner width 24: divisible by 3 for the micro-condition embedders
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,  # = inner width, as in PixArt-XL-2 (1152)
        caption_channels=TINY_T5_DIM,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
        attention_bias=True,
        activation_fn="gelu-approximate",
        interpolation_scale=1,
        use_additional_conditions=False,
    )
    if micro_conditions:
        config.update(sample_size=128, interpolation_scale=2, use_additional_conditions=True)
    config.update(overrides)
    return config


def tiny_transformer(seed: int = 0, micro_conditions: bool = False, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**tiny_transformer_config(micro_conditions, **overrides)).eval()


def tiny_pixart_components(seed: int = 0, micro_conditions: bool = False, **transformer_overrides) -> dict:
    """The five components of a tiny PixArtAlphaPipeline, reproducible from `seed`."""
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(len(tokenizer))
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    transformer = tiny_transformer(seed + 2, micro_conditions, **transformer_overrides)
    # PixArt-alpha ships DPMSolverMultistepScheduler with the linear 1e-4..0.02 schedule over 1000 steps.
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def build_tiny_pixart_pipeline(
    output_dir: str | os.PathLike, seed: int = 0, micro_conditions: bool = False, **transformer_overrides
) -> Path:
    """Write a tiny PixArt-alpha pipeline folder (Hub layout, safetensors) and return its path."""
    from diffusers import PixArtAlphaPipeline

    output_dir = Path(output_dir)
    pipe = PixArtAlphaPipeline(**tiny_pixart_components(seed, micro_conditions, **transformer_overrides))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def tiny_pixart_sigma_components(seed: int = 0, **transformer_overrides) -> dict:
    """The five components of a tiny PixArtSigmaPipeline, reproducible from `seed`.

    As PixArt-Σ differs from PixArt-alpha: a 300-token tokenizer, the SDXL VAE's scaling factor (0.13025, upcast in
    half precision as SDXL's config asks) and no micro-conditions even at sample_size 128.
    """
    components = tiny_pixart_components(seed, micro_conditions=False, **transformer_overrides)
    components["tokenizer"] = tiny_t5_tokenizer(model_max_length=TINY_SIGMA_MAX_SEQUENCE_LENGTH)
    torch.manual_seed(seed + 1)
    components["vae"] = tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)
    return components


def build_tiny_pixart_sigma_pipeline(output_dir: str | os.PathLike, seed: int = 0, **transformer_overrides) -> Path:
    """Write a tiny PixArt-Σ pipeline folder (Hub layout, safetensors) and return its path."""
    import json

    from diffusers import PixArtSigmaPipeline

    output_dir = Path(output_dir)
    PixArtSigmaPipeline(**tiny_pixart_sigma_components(seed, **transformer_overrides)).save_pretrained(
        output_dir, safe_serialization=True
    )
    # The published Σ repositories name the transformer Transformer2DModel; diffusers loads it as a
    # PixArtTransformer2DModel by its ada_norm_single norm. Code that checks class names must see that layout.
    renames = {
        output_dir / "model_index.json": {"transformer": ["diffusers", "Transformer2DModel"]},
        output_dir / "transformer" / "config.json": {"_class_name": "Transformer2DModel"},
    }
    for path, update in renames.items():
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(update)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output_dir


def small_quick_world_teacher(cache_dir: str | os.PathLike):
    """(teacher folder, its TeacherConfig): a 2-layer teacher of `GaussianMixtureWorld.quick()` trained for 100 steps
    into `cache_dir`, a few seconds on one core: enough for tests of the ground-truth code to run on (not to
    distil well)."""
    from .ground_truth import GaussianMixtureWorld, TeacherConfig, load_or_build_teacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, above all on a shared machine
    try:
        config = TeacherConfig.quick(num_layers=2, train_steps=100, batch_size=32, warmup_steps=20)
        return load_or_build_teacher(GaussianMixtureWorld.quick(), config, cache_dir=cache_dir), config
    finally:
        torch.set_num_threads(threads)
