"""PixArt-Σ teachers: the tiny Σ fixture, from_teacher and from_pipe reading the family, equivalence with stock
PixArtSigmaPipeline (300 tokens, the SDXL VAE's scaling factor, the 2K bins), and a short trainer run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb
from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from safetensors.torch import load_file
from stock_diffusers import generate_with_stock_diffusers

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.teachers import load_teacher_pipeline
from sim_diffusers.testing import SDXL_VAE_SCALING_FACTOR, build_tiny_pixart_sigma_pipeline, tiny_transformer

REPO = Path(__file__).resolve().parents[1]
# Longer than PixArt-alpha's 120 tokens (one token per vocabulary word, plus </s>): truncating at 120 changes it.
LONG_PROMPT = " ".join(["a red cat sitting in the snow with a small dog"] * 13)


@pytest.fixture(scope="module")
def sigma_path(tmp_path_factory):
    return build_tiny_pixart_sigma_pipeline(tmp_path_factory.mktemp("tiny_sigma") / "teacher", seed=4)


@pytest.fixture(scope="module")
def sigma(sigma_path):
    pipe = PixArtSigmaPipeline.from_pretrained(sigma_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_sigma_fixture_is_laid_out_as_the_published_repositories(sigma_path, sigma):
    index = json.loads((sigma_path / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["transformer"] == [
        "diffusers",
        "Transformer2DModel",
    ]
    assert isinstance(sigma.transformer, PixArtTransformer2DModel) and not sigma.transformer.use_additional_conditions
    assert sigma.vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR
    assert isinstance(load_teacher_pipeline(sigma_path), PixArtSigmaPipeline)


def test_from_teacher_takes_the_family_from_the_folder_or_the_loaded_pipeline(sigma_path, sigma, tiny_teacher_path):
    from_folder = SIMOneStepPipeline.from_teacher(sigma_path)
    from_loaded = SIMOneStepPipeline.from_teacher(sigma)
    for pipe in (from_folder, from_loaded):
        assert pipe.config.max_sequence_length == 300
        assert pipe.vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR  # the teacher's own VAE
        assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.conditioning_timestep == 440
    assert from_loaded.transformer is not sigma.transformer and from_loaded.vae is sigma.vae
    assert SIMOneStepPipeline.from_teacher(tiny_teacher_path).config.max_sequence_length == 120
    assert SIMOneStepPipeline.from_teacher(sigma_path, max_sequence_length=200).config.max_sequence_length == 200
    embeds, mask, _, _ = from_folder.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert embeds.shape[1] == mask.shape[1] == 300
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline, not a PixArt-alpha or PixArt-Σ pipeline"):
        folder = sigma_path.parent / "sd"
        folder.mkdir(exist_ok=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        SIMOneStepPipeline.from_teacher(folder)


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_equals_stock_pixart_sigma_pipeline(sigma, output_type):
    pipe = SIMOneStepPipeline.from_teacher(sigma)
    perturb(pipe.transformer, seed=9)
    pipe.set_progress_bar_config(disable=True)
    stock = PixArtSigmaPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=pipe.transformer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False),
    )
    stock.set_progress_bar_config(disable=True)
    prompts = ["a red cat", LONG_PROMPT]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t_star = pipe.conditioning_timestep
    alphabar = stock.scheduler.alphas_cumprod[t_star]
    kwargs = dict(output_type=output_type, use_resolution_binning=False)
    ours = np.asarray(pipe(prompts, latents=z, **kwargs).images)
    theirs = stock(
        prompts,
        timesteps=[t_star],
        guidance_scale=1.0,
        latents=(1 - alphabar).sqrt() * z,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    assert np.abs(ours - np.asarray(theirs)).max() < 1e-5
    assert np.abs(ours).max() > 1e-2
    # The Σ length matters: at PixArt-alpha's 120 tokens the long prompt gives another image.
    short = np.asarray(pipe(prompts, latents=z, max_sequence_length=120, **kwargs).images)
    assert np.abs(short[1] - ours[1]).max() > 1e-4 and np.abs(short[0] - ours[0]).max() < 1e-5


def test_resolution_bins_are_those_of_stock_pixart_sigma_including_2k(sigma):
    """A 2K-shaped (sample_size 256) transformer bins sizes as PixArtSigmaPipeline does; its forward is stubbed
    (zero epsilon), so only the chosen latent size is compared."""
    transformer = tiny_transformer(seed=0, sample_size=256)
    transformer.forward = lambda x, **_: (torch.zeros(x.shape[0], 8, *x.shape[2:]),)
    scheduler = DDPMScheduler.from_config(sigma.scheduler.config, clip_sample=False)
    parts = dict(
        tokenizer=sigma.tokenizer,
        text_encoder=sigma.text_encoder,
        vae=sigma.vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    ours, stock = SIMOneStepPipeline(**parts), PixArtSigmaPipeline(**parts)
    stock.set_progress_bar_config(disable=True)
    for height, width in ((2048, 2048), (1000, 3000), (3000, 1200)):
        a = ours("a cat", height=height, width=width, output_type="latent").images
        b = stock(
            "a cat", height=height, width=width, timesteps=[440], guidance_scale=1.0, output_type="latent"
        ).images
        assert a.shape == b.shape, (height, width)
    assert a.shape[-2:] != (3000 // 8, 1200 // 8)  # binned, not the requested size


def test_from_pipe_with_pixart_sigma_both_ways(sigma):
    one_step = SIMOneStepPipeline.from_pipe(sigma)
    assert one_step.config.max_sequence_length == 300
    assert one_step.text_encoder is sigma.text_encoder and one_step.transformer is sigma.transformer
    one_step = SIMOneStepPipeline.from_pipe(sigma, conditioning_timestep=400)
    back = PixArtSigmaPipeline.from_pipe(one_step)
    assert back.vae is sigma.vae and back.transformer is sigma.transformer
    again = SIMOneStepPipeline.from_pipe(back)
    assert (again.conditioning_timestep, again.config.max_sequence_length) == (400, 300)
    # An alpha pipeline built from the Σ-derived one keeps the Σ length too (the config travels privately).
    assert SIMOneStepPipeline.from_pipe(PixArtAlphaPipeline.from_pipe(one_step)).config.max_sequence_length == 300


def test_trainer_distils_a_sigma_teacher_and_stock_diffusers_loads_the_result(sigma_path, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat\na blue dog\na green bird\n" + LONG_PROMPT + "\n", encoding="utf-8")
    out, cache = tmp_path / "sim-sigma", tmp_path / "t5-cache"
    cmd = [
        sys.executable,
        str(REPO / "training_scripts" / "train_sim_pixart.py"),
        "--pretrained_model_name_or_path",
        str(sigma_path),
        "--caption_file",
        str(captions),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "2",
        "--report_to",
        "none",
        "--regression_warmup_steps",
        "1",
        "--learning_rate",
        "1e-2",
        "--fake_score_learning_rate",
        "1e-2",
        "--adam_epsilon",
        "1.0",
        "--checkpointing_steps",
        "10",
        "--text_embedding_cache",
        str(cache),
        "--regression_num_inference_steps",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((cache / "index.json").read_text())["max_sequence_length"] == 300  # Σ's length, unasked
    index = json.loads((out / "model_index.json").read_text())
    assert index["max_sequence_length"] == 300 and index["_class_name"] == [
        "pipeline_sim_one_step",
        "SIMOneStepPipeline",
    ]
    trained = SIMOneStepPipeline.from_pretrained(out)
    assert trained.vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR and trained.text_encoder is not None
    teacher = load_file(str(sigma_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((weights[k] - teacher[k]).abs().max().item() for k in teacher) > 1e-4  # it trained
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert "pixart-sigma" in header and "pixart-alpha" not in header and "PixArt-Σ teacher" in card
    assert "SIMOneStepPipeline.from_pretrained" in card and "trust_remote_code=True" in card

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs, report = generate_with_stock_diffusers(out, ["a red cat", LONG_PROMPT], z, tmp_path / "stock")
    assert report["config"]["max_sequence_length"] == 300
    trained.set_progress_bar_config(disable=True)
    assert torch.equal(outputs["latent"], trained(["a red cat", LONG_PROMPT], latents=z, output_type="latent").images)
