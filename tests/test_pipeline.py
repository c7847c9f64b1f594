"""SIMOneStepPipeline: stock-pipeline equivalence, round trips, from_teacher, outputs and input errors."""

import json

import numpy as np
import pytest
import torch
from conftest import perturb
from diffusers import DDPMScheduler, PixArtAlphaPipeline
from safetensors.torch import load_file

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.testing import tiny_transformer


@pytest.fixture
def teacher(tiny_teacher_path):
    return PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)


@pytest.fixture
def pipe(teacher):
    pipe = SIMOneStepPipeline.from_teacher(teacher)
    perturb(pipe.transformer, seed=123)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_one_step(pipe, prompt, z, **kwargs):
    """diffusers' own PixArtAlphaPipeline run as a one-step DDPM x0 prediction from sqrt(1 - alphabar[t*]) z."""
    stock = PixArtAlphaPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=pipe.transformer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False),
    )
    stock.set_progress_bar_config(disable=True)
    t_star = pipe.conditioning_timestep
    alphabar = stock.scheduler.alphas_cumprod[t_star]
    return stock(prompt, timesteps=[t_star], guidance_scale=1.0, latents=(1 - alphabar).sqrt() * z, **kwargs).images


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_equals_stock_pixart_pipeline_512_style(pipe, output_type):
    prompts = ["a red cat", "A photo of a blue dog sitting in the snow"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(output_type=output_type, use_resolution_binning=False)
    ours = pipe(prompts, latents=z, **kwargs).images
    theirs = stock_one_step(pipe, prompts, z, **kwargs)
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() < 1e-5
    assert np.abs(np.asarray(ours)).max() > 1e-2  # not trivially zero


def test_equals_stock_pixart_pipeline_1024_ms_style_with_micro_conditions(tiny_ms_teacher_path):
    pipe = SIMOneStepPipeline.from_teacher(tiny_ms_teacher_path)
    perturb(pipe.transformer, seed=7)
    assert pipe.transformer.config.sample_size == 128 and pipe.transformer.use_additional_conditions
    z = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(output_type="latent", use_resolution_binning=False, height=128, width=64)
    ours = pipe("a house by the lake", latents=z, **kwargs).images
    theirs = stock_one_step(pipe, "a house by the lake", z, **kwargs)
    assert (ours - theirs).abs().max() < 1e-5
    # The micro-conditions matter: another aspect ratio changes the output for the same noise.
    pipe.transformer.adaln_single.emb.resolution_embedder.linear_1.weight.data.normal_()
    other = pipe(
        "a house by the lake", latents=z, output_type="latent", use_resolution_binning=False, height=128, width=64
    )
    assert (other.images - ours).abs().max() > 1e-4


def test_latents_are_unscaled_noise_and_seeded_generation_is_reproducible(pipe):
    g = torch.Generator().manual_seed(5)
    a = pipe("a cat", generator=g, output_type="latent").images
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    b = pipe("a cat", latents=z, output_type="latent").images
    torch.testing.assert_close(a, b)
    c = pipe("a cat", latents=2 * z, output_type="latent").images
    assert (c - a).abs().max() > 1e-3


def test_every_output_type(pipe):
    pil = pipe(["a cat", "a dog"], output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (64, 64)
    arr = pipe("a cat", num_images_per_prompt=3, output_type="np").images
    assert arr.shape == (3, 64, 64, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    pt = pipe("a cat", output_type="pt", height=128, width=64).images
    assert pt.shape == (1, 3, 128, 64)
    latent = pipe("a cat", output_type="latent", height=128, width=64).images
    assert latent.shape == (1, 4, 16, 8)
    (images,) = pipe("a cat", output_type="np", return_dict=False)
    assert images.shape == (1, 64, 64, 3)


def test_prompt_embeds_input_matches_prompt(pipe):
    embeds, mask, _, _ = pipe.encode_prompt(["a red cat", "a dog"], do_classifier_free_guidance=False)
    z = torch.randn(2, 4, 8, 8)
    from_text = pipe(["a red cat", "a dog"], latents=z, output_type="latent").images
    from_embeds = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="latent").images
    torch.testing.assert_close(from_text, from_embeds)
    # Without a text encoder, embeddings still work (the trainer's cached-embedding path).
    pipe.text_encoder = None
    no_t5 = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="latent").images
    torch.testing.assert_close(no_t5, from_text)


def test_save_and_load_round_trip_is_bit_exact_and_safetensors_only(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sim")
    index = json.loads((tmp_path / "sim" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sim_one_step", "SIMOneStepPipeline"]  # the folder's own code
    assert index["conditioning_timestep"] == pipe.conditioning_timestep
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    weights = sorted(
        p.name for p in (tmp_path / "sim").rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".safetensors"}
    )
    assert weights and all(name.endswith(".safetensors") for name in weights)

    loaded = SIMOneStepPipeline.from_pretrained(tmp_path / "sim")
    saved = load_file(tmp_path / "sim" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, tensor in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], tensor)
        assert torch.equal(saved[name], tensor)
    z = torch.randn(1, 4, 8, 8)
    a, b = (
        pipe("a cat", latents=z, output_type="latent").images,
        loaded("a cat", latents=z, output_type="latent").images,
    )
    # Weights are bit-exact; outputs may differ in the last float bit (CPU kernels pick paths by memory alignment).
    assert (a - b).abs().max() < 1e-5


def test_conditioning_timestep_is_configurable_and_saved(teacher, tmp_path):
    pipe = SIMOneStepPipeline.from_teacher(teacher, conditioning_timestep=400)
    pipe.save_pretrained(tmp_path / "sim")
    assert SIMOneStepPipeline.from_pretrained(tmp_path / "sim").conditioning_timestep == 400
    with pytest.raises(ValueError, match="conditioning_timestep"):
        SIMOneStepPipeline.from_teacher(teacher, conditioning_timestep=1000)


def test_from_teacher_folder_and_loaded_pipeline_agree_and_leave_teacher_untouched(tiny_teacher_path, teacher):
    from_folder = SIMOneStepPipeline.from_teacher(tiny_teacher_path)
    from_loaded = SIMOneStepPipeline.from_teacher(teacher)
    assert from_loaded.transformer is not teacher.transformer
    assert from_loaded.text_encoder is teacher.text_encoder  # frozen parts are shared, not copied
    for (name, a), b in zip(from_folder.transformer.state_dict().items(), teacher.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(from_folder.scheduler, DDPMScheduler) and not from_folder.scheduler.config.clip_sample
    with torch.no_grad():
        next(from_loaded.transformer.parameters()).add_(1.0)
    assert not torch.equal(next(from_loaded.transformer.parameters()), next(teacher.transformer.parameters()))
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(
        from_folder("a cat", latents=z, output_type="latent").images,
        SIMOneStepPipeline.from_teacher(teacher)("a cat", latents=z, output_type="latent").images,
    )


def test_auto_encoder_tiny_is_accepted(pipe):
    from diffusers import AutoencoderTiny

    pipe.vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    pipe.register_modules(vae=pipe.vae)
    images = pipe("a cat", output_type="np").images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a cat", height=60), "divisible by 16"),
        (dict(prompt="a cat", width=72), "divisible by 16"),
        (
            dict(prompt="a cat", prompt_embeds=torch.zeros(1, 120, 32), prompt_attention_mask=torch.ones(1, 120)),
            "not both",
        ),
        (dict(), "one of `prompt` or `prompt_embeds`"),
        (dict(prompt=[]), "empty list"),
        (dict(prompt=["a", "b"], generator=[torch.Generator()] * 3), "3 generators for 2 images"),
        (dict(prompt="a", num_images_per_prompt=2, generator=[torch.Generator()]), "1 generators for 2 images"),
        (dict(prompt_embeds=torch.zeros(1, 120, 32)), "prompt_attention_mask"),
        (dict(prompt="a cat", output_type="jpeg"), "output_type"),
        (dict(prompt="a cat", latents=torch.zeros(1, 4, 4, 4)), "shape"),
    ],
)
def test_bad_input_gives_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_rejects_a_transformer_that_is_not_pixart_when_called(pipe):
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    other = SIMOneStepPipeline(
        pipe.tokenizer, pipe.text_encoder, pipe.vae, unet, pipe.scheduler
    )  # diffusers-style: built as given
    with pytest.raises(ValueError, match="PixArtTransformer2DModel as `transformer`, got UNet2DModel"):
        other("a cat")


def test_resolution_binning_on_a_512_model_resizes_back(teacher):
    """A transformer with the real 512 model's sample_size uses PixArt's 512 bins and returns the requested size."""
    transformer = tiny_transformer(seed=3, sample_size=64)
    pipe = SIMOneStepPipeline(
        teacher.tokenizer,
        teacher.text_encoder,
        teacher.vae,
        transformer,
        DDPMScheduler.from_config(teacher.scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", height=200, width=360, output_type="pt").images
    assert image.shape == (1, 3, 200, 360)
