"""The Gaussian-mixture world: exact epsilon, metrics, samplers, the teacher cache, and a tiny PixArt teacher of the
quick world. (The research diagnostics and instruments built on it are tested in research/tests.)"""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.generator import predict_eps
from sim_diffusers.ground_truth import (
    GaussianMixtureWorld,
    caption_metrics,
    chi_quantile,
    default_cache_dir,
    encode_world_captions,
    evaluate_pipeline_latents,
    load_or_build_teacher,
    load_world,
    mmd,
    pixart_alphas_cumprod,
    read_teacher_record,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)
from sim_diffusers.schedule import diffuse


@pytest.fixture(scope="module")
def world():
    return GaussianMixtureWorld.quick()


def pixart_dpm_solver():
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def noisy(world, caption_idx, timesteps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = world.sample_x0(caption_idx, generator=generator)
    return diffuse(x0, timesteps, torch.randn(x0.shape, generator=generator), pixart_alphas_cumprod())[0]


# -- the world ------------------------------------------------------------------------------------------------------


def test_world_is_reproducible_separated_and_round_trips(world):
    assert world.captions == ("a red circle", "a blue square")
    assert torch.equal(world.means, GaussianMixtureWorld.quick().means)
    assert not torch.equal(world.means, GaussianMixtureWorld.quick(seed=1).means)
    assert world.means.shape == (2, 2, 4, 4, 4)
    assert torch.equal(world.means.abs(), torch.full_like(world.means, world.amplitude))  # block sign patterns
    assert world.min_mode_separation > 2 * world.fidelity_radius
    assert GaussianMixtureWorld.from_dict(json.loads(json.dumps(world.to_dict()))) == world
    assert GaussianMixtureWorld.from_dict(world.to_dict()).fingerprint() == world.fingerprint()
    with pytest.raises(ValueError, match="mode_weights"):
        GaussianMixtureWorld(mode_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="overlap|patterns"):
        GaussianMixtureWorld.quick(mode_std=0.8)


def test_pixart_schedule_is_diffusers_linear_schedule():
    expected = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod
    assert torch.equal(pixart_alphas_cumprod(), expected)
    assert torch.equal(pixart_dpm_solver().alphas_cumprod, expected)


def test_sample_x0_follows_mode_weights(world):
    x0, modes = world.sample_x0(1, 4000, torch.Generator().manual_seed(0), return_modes=True)
    assert x0.shape == (4000, 4, 4, 4)
    assert torch.equal(modes // world.modes_per_caption, torch.ones_like(modes))
    frequencies = torch.bincount(modes % world.modes_per_caption) / 4000
    assert torch.allclose(frequencies, world.weights, atol=0.03)
    assert torch.equal(world.assign_modes(x0)[0], modes)
    unconditional = world.sample_x0(None, 4000, torch.Generator().manual_seed(1), return_modes=True)[1]
    caption_frequencies = torch.bincount(unconditional // world.modes_per_caption) / 4000
    assert torch.allclose(caption_frequencies, torch.full((2,), 0.5), atol=0.03)


@pytest.mark.parametrize("caption_idx", [None, 0, 1, "mixed"])
def test_exact_eps_is_minus_sigma_times_score_of_closed_form_density(world, caption_idx):
    timesteps = torch.tensor([0, 10, 200, 440, 700, 999])
    if caption_idx == "mixed":
        caption_idx = torch.tensor([0, 1, -1, 0, -1, 1])
    x_t = noisy(world, torch.tensor([0, 1, 0, 1, 1, 0]), timesteps).double().requires_grad_()
    (score,) = torch.autograd.grad(world.log_prob(x_t, caption_idx, timesteps).sum(), x_t)
    sigma = (1 - pixart_alphas_cumprod()[timesteps].double()).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(world.exact_eps(x_t.detach(), timesteps, caption_idx), -sigma * score)


def test_exact_eps_of_a_single_gaussian_is_its_closed_form():
    world = GaussianMixtureWorld.quick(modes_per_caption=1, mode_weights=(1.0,))
    x_t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    alpha, sigma = 0.6, 0.8
    var = alpha**2 * world.mode_std**2 + sigma**2
    expected = sigma * (x_t - alpha * world.means[1, 0]) / var
    torch.testing.assert_close(world.exact_eps_at(x_t, alpha, sigma, 1), expected)
    # The posterior mean of x0 is the Gaussian one, and eps* reproduces x_t with it.
    alphabar = pixart_alphas_cumprod()[300]
    x0_hat = world.posterior_mean_x0(x_t, 300, 1)
    eps = world.exact_eps(x_t, 300, 1)
    torch.testing.assert_close(alphabar.sqrt() * x0_hat + (1 - alphabar).sqrt() * eps, x_t)


def test_unconditional_eps_is_the_caption_posterior_mixture_of_conditional_eps(world):
    timesteps = torch.tensor([50, 400, 650, 800])
    x_t = noisy(world, torch.tensor([0, 1, 1, 0]), timesteps)
    log_p = torch.stack([world.log_prob(x_t, c, timesteps) for c in range(world.num_captions)], dim=1)  # (B, C)
    torch.testing.assert_close(world.log_prob(x_t, None, timesteps), log_p.logsumexp(1) - math.log(2))
    caption_posterior = log_p.softmax(dim=1).float()
    eps_c = torch.stack([world.exact_eps(x_t, timesteps, c) for c in range(world.num_captions)], dim=1)
    mixture = (caption_posterior.view(4, 2, 1, 1, 1) * eps_c).sum(1)
    torch.testing.assert_close(world.exact_eps(x_t, timesteps, None), mixture, rtol=1e-4, atol=1e-5)
    guided = world.guided_exact_eps(x_t, timesteps, 0, 3.0)
    eps_u = world.exact_eps(x_t, timesteps, None)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c[:, 0] - eps_u))


# -- metrics ----------------------------------------------------------------------------------------------------------


def test_chi_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (16, 64, 256):
        assert chi_quantile(dof, 0.999) == pytest.approx(stats.chi.ppf(0.999, dof), rel=2e-3)


def test_exact_samples_score_perfectly_and_the_floor_matches(world):
    samples = [world.sample_x0(c, 256, torch.Generator().manual_seed(10 + c)) for c in range(2)]
    result = evaluate_pipeline_latents(world, samples)
    assert result["mean"]["fidelity"] == 1.0 and result["mean"]["coverage"] == 1.0
    assert result["mean"]["off_caption"] == 0.0
    assert result["mean"]["weight_tv"] < 0.08
    floor = result["floor"]
    assert floor["fidelity"] == 1.0 and floor["weight_tv"] < 0.08 and 0 < floor["mmd"] < 0.2
    assert result["mean"]["mmd"] < 2 * floor["mmd"]
    by_caption = evaluate_pipeline_latents(world, {"a blue square": samples[1], 0: samples[0]})
    assert by_caption["mean"] == result["mean"]


def test_metrics_catch_collapse_blur_wrong_captions_and_noise(world):
    reference = world.sample_x0(0, 256, torch.Generator().manual_seed(0))
    floor = mmd(world.sample_x0(0, 256, torch.Generator().manual_seed(1)), reference, world.mmd_bandwidth)
    x0, modes = world.sample_x0(0, 512, torch.Generator().manual_seed(2), return_modes=True)

    collapsed = caption_metrics(world, 0, x0[modes == 0][:256], reference)
    assert collapsed["fidelity"] == 1.0 and collapsed["coverage"] == 0.5
    assert collapsed["weight_tv"] == pytest.approx(1 - world.weights[0].item())
    assert collapsed["mmd"] > 3 * floor

    # The weighted average of the caption's modes (what a one-step denoiser from pure noise returns) is off-mode.
    blend = (world.weights @ world.means[0].reshape(2, -1)).reshape(1, 4, 4, 4) + 0.05 * torch.randn(256, 4, 4, 4)
    blurred = caption_metrics(world, 0, blend, reference)
    assert blurred["fidelity"] == 0.0 and blurred["coverage"] == 0.0 and blurred["weight_tv"] == 1.0

    wrong = caption_metrics(world, 0, world.sample_x0(1, 256, torch.Generator().manual_seed(3)), reference)
    assert wrong["fidelity"] == 0.0 and wrong["off_caption"] == 1.0

    noise = caption_metrics(world, 0, torch.randn(256, 4, 4, 4), reference)
    assert noise["fidelity"] == 0.0 and noise["mmd"] > 5 * floor

    too_wide = reference + 0.3 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(4))
    assert caption_metrics(world, 0, too_wide, reference)["mmd"] > 3 * floor


def test_exact_eps_oracle_with_dpm_solver_recovers_the_world(world):
    result = evaluate_pipeline_latents(world, sample_exact_latents(world, pixart_dpm_solver(), 128, 20))
    assert result["mean"]["fidelity"] > 0.97 and result["mean"]["coverage"] == 1.0
    assert result["mean"]["weight_tv"] < 0.1 and result["mean"]["mmd"] < 3 * result["floor"]["mmd"]
    one_step = evaluate_pipeline_latents(world, sample_exact_latents(world, pixart_dpm_solver(), 128, 1))
    assert one_step["mean"]["coverage"] < 1.0


# -- pipelines --------------------------------------------------------------------------------------------------------


def test_teacher_loop_matches_pixart_pipeline(tiny_teacher_path):
    world = GaussianMixtureWorld(num_captions=2)  # 4x8x8 latents, like the tiny fixture teacher
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)
    for guidance_scale in (1.0, 4.5):
        from_pipeline = sample_teacher_latents(pipe, world, 3, 2, guidance_scale, seed=5, use_pipeline=True)
        from_loop = sample_teacher_latents(pipe, world, 3, 2, guidance_scale, seed=5, use_pipeline=False)
        for a, b in zip(from_pipeline, from_loop):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert sample_teacher_latents(pipe, world, 3, 1, 4.5)[0].shape == (3, 4, 8, 8)  # the pipeline cannot do 1 step


def test_padding_tokens_do_not_change_the_teacher_epsilon(tiny_teacher_path):
    """The teacher is trained on embeddings cut after the last real token: the same function as 120 tokens."""
    world = GaussianMixtureWorld(num_captions=3)
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)
    embeds, mask, _, _ = encode_world_captions(pipe, world)
    assert embeds.shape[1] == 120 and int(mask.sum(1).max()) < 10
    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    full = predict_eps(pipe.transformer, x_t, t, embeds, mask)
    cut = predict_eps(pipe.transformer, x_t, t, embeds[:, :10], mask[:, :10])
    torch.testing.assert_close(full, cut, rtol=1e-5, atol=1e-5)


def test_the_teacher_cache_is_a_user_cache_the_environment_can_move(monkeypatch, tmp_path):
    monkeypatch.delenv("SIM_DIFFUSERS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sim_diffusers" / "ground_truth"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sim_diffusers" / "ground_truth"
    monkeypatch.setenv("SIM_DIFFUSERS_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "ground_truth"


@pytest.fixture(scope="module")
def quick_teacher(tmp_path_factory):
    """(teacher folder, its TeacherConfig) of the quick world, in a temporary cache (never the user's)."""
    from sim_diffusers.testing import small_quick_world_teacher

    return small_quick_world_teacher(tmp_path_factory.mktemp("ground_truth"))


def test_quick_teacher_is_a_cached_pixart_pipeline_that_learned_the_exact_eps(quick_teacher, world, monkeypatch):
    path, config = quick_teacher
    assert (path / "model_index.json").exists() and list(path.glob("transformer/*.safetensors"))
    assert load_world(path) == world
    record = read_teacher_record(path)
    assert record["teacher"]["train_steps"] == 100 and record["captions"] == list(world.captions)
    errors = record["relative_eps_error"]
    assert errors["uniform_t"]["conditional"] < 0.2 and errors["uniform_t"]["unconditional"] < 0.2
    assert record["final_loss"] < 0.2

    # Cached: a second call does not train.
    import sim_diffusers.ground_truth.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "train_teacher", lambda *a, **k: pytest.fail("retrained a cached teacher"))
    assert load_or_build_teacher(world, config, cache_dir=path.parent) == path

    pipe = PixArtAlphaPipeline.from_pretrained(path)
    assert pipe.transformer.config.sample_size == 4 and pipe.transformer.config.out_channels == 8
    latents = sample_teacher_latents(pipe, world, 4, 2, 4.5)
    assert [tuple(x.shape) for x in latents] == [(4, 4, 4, 4)] * 2


def test_sample_pipeline_latents_of_the_one_step_generator(quick_teacher, world):
    path, _ = quick_teacher
    generator = SIMOneStepPipeline.from_teacher(path)
    first = sample_pipeline_latents(generator, world, 5, seed=3)
    again = sample_pipeline_latents(generator, world, 5, seed=3)
    assert [tuple(x.shape) for x in first] == [(5, 4, 4, 4)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    result = evaluate_pipeline_latents(world, first)
    assert set(result["mean"]) == {"fidelity", "coverage", "weight_tv", "mmd", "off_caption"}
