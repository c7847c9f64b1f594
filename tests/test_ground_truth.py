"""The Gaussian-mixture world: exact epsilon, metrics, samplers, and a tiny PixArt teacher of the quick world."""

import copy
import json
import math
import sys

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.generator import predict_eps
from sim_diffusers.ground_truth import (
    METRIC_KEYS,
    GaussianMixtureWorld,
    TeacherConfig,
    band_widths,
    circle_crossings,
    caption_metrics,
    chi_quantile,
    encode_world_captions,
    evaluate_pipeline_latents,
    load_or_build_teacher,
    load_world,
    mmd,
    off_mode_anatomy,
    pixart_alphas_cumprod,
    read_teacher_record,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)


@pytest.fixture(scope="module")
def world():
    return GaussianMixtureWorld.quick()


def pixart_dpm_solver():
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def noisy(world, caption_idx, timesteps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = world.sample_x0(caption_idx, generator=generator)
    alphabar = pixart_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    return alphabar.sqrt() * x0 + (1 - alphabar).sqrt() * torch.randn(x0.shape, generator=generator)


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


def test_off_mode_anatomy_tells_global_blends_from_regions_that_follow_different_modes(world):
    on_mode = world.sample_x0(0, 64, torch.Generator().manual_seed(0))
    assert off_mode_anatomy(world, 0, on_mode) == {"off_mode": 0.0, "committed_nearest": 0.0, "committed_second": 0.0,
                                                   "in_between": 0.0, "regionally_inconsistent": 0.0}
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    global_blend = (0.6 * mu_a + 0.4 * mu_b).expand(8, -1, -1, -1)
    blend = off_mode_anatomy(world, 0, global_blend)
    assert blend["off_mode"] == 1.0 and blend["in_between"] == 1.0 and blend["regionally_inconsistent"] == 0.0

    # Half of the contested blocks take mode a's value, the other half mode b's: a patchwork of the two modes.
    contested = torch.nonzero(world.patterns(mu_a[None])[0] != world.patterns(mu_b[None])[0]).flatten()
    take_b = torch.zeros(world.num_blocks, dtype=torch.bool)
    take_b[contested[: len(contested) // 2]] = True
    grid = (world.latent_shape[0], world.latent_shape[1] // world.block_size, world.latent_shape[2] // world.block_size)
    mask = take_b.reshape(grid).repeat_interleave(world.block_size, 1).repeat_interleave(world.block_size, 2)
    patchwork = off_mode_anatomy(world, 0, torch.where(mask, mu_b, mu_a).expand(8, -1, -1, -1))
    assert patchwork["off_mode"] == 1.0 and patchwork["regionally_inconsistent"] == 1.0
    assert patchwork["in_between"] == 0.0
    assert patchwork["committed_nearest"] + patchwork["committed_second"] == pytest.approx(1.0)
    assert 0.3 < patchwork["committed_second"] <= 0.5


def test_band_widths_measure_the_off_mode_run_through_the_centre_of_each_line(world):
    offsets = torch.arange(-20, 21) * 0.05  # 0 at index 20
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    blend = 0.5 * (mu_a + mu_b)

    def line(left, right, band=(-0.3, 0.2)):  # left mode below the band, right mode above, the blend inside
        picks = [left if u < band[0] else right if u > band[1] else blend for u in offsets.tolist()]
        return torch.stack(picks)

    lines = torch.stack([line(mu_a, mu_b), line(mu_a, mu_a), line(blend, blend), line(mu_b, mu_b, band=(0.5, 0.6))])
    result = band_widths(world, 0, lines, offsets)
    assert result["width"][0] == pytest.approx(0.5, abs=0.05 + 1e-6)  # the band is 0.5 wide
    assert result["between_modes"].tolist() == [True, False, False, False]  # the second is an excursion from mode a
    assert result["width"][1] == result["width"][0]
    assert result["censored"].tolist() == [False, False, True, False] and math.isnan(result["width"][2])
    assert result["width"][3] == 0.0  # the centre is on a mode: no band there
    jump = float((mu_a - blend).norm()) / 0.05
    assert result["max_slope"][0] == pytest.approx(jump, rel=1e-4) and result["max_slope"][2] == 0.0

    with pytest.raises(ValueError, match="offsets"):
        band_widths(world, 0, lines, offsets + 0.01)  # no 0: no off-mode sample to measure through


def test_circle_crossings_count_changes_of_mode_round_each_circle(world):
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    off = 0.5 * (mu_a + mu_b)
    circles = torch.stack([
        torch.stack([mu_a, mu_a, off, mu_b, mu_b, mu_a, off, off]),  # a -band- b, b -clean- a, then off and back to a
        torch.stack([mu_b, off, mu_b, mu_b, mu_b, mu_b, mu_b, mu_b]),  # one excursion, no crossing
        torch.stack([off] * 8),
    ])
    assert circle_crossings(world, 0, circles) == {
        "circles": 3, "points": 24, "off_mode": 12, "crossings": 2, "clean": 1, "band_points": 1,
        "excursion_points": 3, "circles_off_mode": 1}
    # Round the end of the circle is a crossing too.
    wrapped = torch.stack([mu_b, mu_b, mu_a, mu_a, off, off, off, off])[None]
    assert circle_crossings(world, 0, wrapped)["crossings"] == 2 and circle_crossings(world, 0, wrapped)["band_points"] == 4


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


@pytest.fixture(scope="module")
def quick_teacher(tmp_path_factory, world):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, above all on a shared machine
    try:
        config = TeacherConfig.quick(num_layers=2, train_steps=100, batch_size=32, warmup_steps=20)
        path = load_or_build_teacher(world, config, cache_dir=tmp_path_factory.mktemp("ground_truth"))
    finally:
        torch.set_num_threads(threads)
    return path, config


def benchmark_script(name: str):
    """benchmarks/ground_truth/<name>.py as a module (it puts its folder on sys.path, so `_common` is importable)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / "ground_truth" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    import sim_diffusers.ground_truth as ground_truth

    monkeypatch.setattr(ground_truth, "train_teacher", lambda *a, **k: pytest.fail("retrained a cached teacher"))
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


def test_screening_harness_trains_scores_and_records(quick_teacher, world, tmp_path, monkeypatch):
    """benchmarks/ground_truth/screen.py (the fast ablation loop) runs every option it offers and changes the generator."""
    from safetensors.torch import load_file

    path, config = quick_teacher
    screen = benchmark_script("screen")
    monkeypatch.setattr(sys.modules["_common"], "world_and_config", lambda args: (world, config))
    out, saved = tmp_path / "screen.jsonl", tmp_path / "generator.safetensors"
    args = screen.parse_args([
        "--world", "quick", "--cache_dir", str(path.parent), "--steps", "2", "--eval_every", "1", "--num_samples", "8",
        "--train_batch_size", "4", "--regression_weight", "1", "--regression_batch_size", "2",
        "--regression_num_inference_steps", "2", "--regression_space", "denoised", "--ema_decay", "0.9",
        "--lr_schedule", "cosine", "--fake_warmup_steps", "1", "--save", str(saved), "--out", str(out),
    ])
    screen.main(args)
    record = json.loads(out.read_text().splitlines()[-1])
    assert [row["step"] for row in record["curve"]] == [0, 1, 2]
    assert set(record["curve"][2]["ema"]) == {"fidelity", "coverage", "weight_tv", "mmd", "off_caption"}
    assert "gan_d_loss" not in record["curve"][2]

    # The adversarial term (the discriminator sees real and fake samples at every step and its losses are logged) and
    # the batch-OT coupling of the regression.
    with pytest.raises(SystemExit):  # it acts on the regression samples, so without them it is refused at once
        screen.parse_args(["--gan_weight", "0.5"])
    for refused in (["--regression_tolerance", "2"], ["--regression_weight", "1", "--regression_tolerance", "-1"],
                    ["--regression_weight", "1", "--regression_space", "denoised", "--regression_tolerance", "2"],
                    ["--extra_layers", "-1"]):
        with pytest.raises(SystemExit):
            screen.parse_args(refused)
    assert screen.parse_args(["--regression_weight", "1", "--regression_tolerance", "2"]).regression_tolerance == 2
    args.regression_space, args.gan_weight, args.regression_coupling, args.save = "x0", 0.5, "batch_ot", None
    screen.main(args)
    last = json.loads(out.read_text().splitlines()[-1])["curve"][2]
    assert 0 < last["gan_d_loss"] < 10 and 0 < last["gan_g_loss"] < 10
    teacher = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(saved))
    assert max((trained[k] - teacher[k]).abs().max().item() for k in teacher) > 0


def test_ode_map_fit_trains_saves_and_seeds_the_screening_harness(quick_teacher, world, tmp_path, monkeypatch):
    """fit_ode_map.py fits the generator to cached teacher-ODE pairs; screen.py --init_generator starts from its weights
    (its step-0 scores are the fit's last ones: same weights, same evaluation noise)."""

    from safetensors.torch import load_file

    path, config = quick_teacher
    modules = {name: benchmark_script(name) for name in ("fit_ode_map", "screen")}
    monkeypatch.setattr(sys.modules["_common"], "world_and_config", lambda args: (world, config))
    common = ["--world", "quick", "--cache_dir", str(path.parent), "--num_samples", "8"]
    saved, fit_out = tmp_path / "fit.safetensors", tmp_path / "fit.jsonl"
    fit_args = common + ["--num_pairs", "4", "--num_inference_steps", "2", "--steps", "3", "--eval_every", "3",
                         "--train_batch_size", "4", "--lr", "1e-3", "--save", str(saved), "--out", str(fit_out)]
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(fit_args))
    assert any(p.name.startswith("ode_pairs_") for p in path.parent.iterdir())  # the pairs are cached for the next fit
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(fit_args))  # from the cached pairs: the same fit
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(fit_args[:-4] + ["--distance", "pseudo_huber", "--out", str(fit_out)]))
    first, second, huber = [json.loads(line) for line in fit_out.read_text().splitlines()]
    assert first["curve"] == second["curve"]
    assert huber["curve"][0] == first["curve"][0] and huber["curve"][-1] != first["curve"][-1]  # --distance is used
    assert first["curve"][-1]["on_training_noise"]["mse"] < first["curve"][0]["on_training_noise"]["mse"]  # it fits its pairs
    teacher = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((load_file(str(saved))[k] - teacher[k]).abs().max().item() for k in teacher) > 0

    screen_out = tmp_path / "screen.jsonl"
    modules["screen"].main(modules["screen"].parse_args(common + [
        "--steps", "0", "--init_generator", str(saved), "--out", str(screen_out)]))
    start = json.loads(screen_out.read_text())["curve"][0]
    assert {k: start[k] for k in METRIC_KEYS} == {k: first["curve"][-1][k] for k in METRIC_KEYS}

    # A deeper generator (--extra_layers) starts as the teacher's function exactly and then fits differently.
    deep_out, deep_saved = tmp_path / "deep.jsonl", tmp_path / "deep.safetensors"
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(
        fit_args[:-4] + ["--extra_layers", "2", "--save", str(deep_saved), "--out", str(deep_out)]))
    deep = json.loads(deep_out.read_text())
    assert deep["curve"][0] == first["curve"][0] and deep["curve"][-1] != first["curve"][-1]
    # screen.py --extra_layers builds the same deeper generator, so it can start from the deeper fit.
    modules["screen"].main(modules["screen"].parse_args(common + [
        "--steps", "0", "--extra_layers", "2", "--init_generator", str(deep_saved), "--out", str(screen_out)]))
    deep_start = json.loads(screen_out.read_text().splitlines()[-1])["curve"][0]
    assert {k: deep_start[k] for k in METRIC_KEYS} == {k: deep["curve"][-1][k] for k in METRIC_KEYS}
    teacher_model = PixArtTransformer2DModel.from_pretrained(path / "transformer")
    deeper = modules["fit_ode_map"].deepen(copy.deepcopy(teacher_model), 2)
    assert len(deeper.transformer_blocks) == deeper.config.num_layers == teacher_model.config.num_layers + 2
    deepest = modules["fit_ode_map"].deepen(copy.deepcopy(teacher_model), 2 * teacher_model.config.num_layers + 1)
    assert len(deepest.transformer_blocks) == 3 * teacher_model.config.num_layers + 1
    assert deepest.transformer_blocks[1].ff.net[-1].weight.abs().max() == 0  # the copies start as identities
    assert deepest.transformer_blocks[0].ff.net[-1].weight.abs().max() > 0
    with pytest.raises(ValueError, match="extra_layers"):
        modules["fit_ode_map"].deepen(teacher_model, -1)
    with pytest.raises(SystemExit):  # and the scripts refuse it before loading anything
        modules["fit_ode_map"].parse_args(["--extra_layers", "-1"])


def test_anatomy_script_scores_generators_and_the_teacher(quick_teacher, world, monkeypatch):
    path, config = quick_teacher
    anatomy = benchmark_script("anatomy")
    monkeypatch.setattr(sys.modules["_common"], "world_and_config", lambda args: (world, config))
    common = ["--world", "quick", "--cache_dir", str(path.parent), "--num_samples", "16"]
    with pytest.raises(SystemExit, match="holds no generator"):
        anatomy.main(anatomy.parse_args([str(path / "nowhere"), *common]))
    # The teacher's own weights as a generator are the untrained one-step generator: the same row.
    rows = anatomy.main(anatomy.parse_args([str(path), "--untrained", "--teacher_steps", "2", *common]))
    assert list(rows) == ["teacher 2 steps", "untrained one-step generator", str(path)]
    assert rows[str(path)] == rows["untrained one-step generator"]
    for r in rows.values():
        assert r["fidelity"] + r["off_mode"] == pytest.approx(1.0)


def test_transitions_script_measures_bands_and_crossings_and_loads_deeper_weights(quick_teacher, world, tmp_path,
                                                                                   monkeypatch):
    path, config = quick_teacher
    transitions = benchmark_script("transitions")
    common_module = sys.modules["_common"]
    monkeypatch.setattr(common_module, "world_and_config", lambda args: (world, config))
    common = ["--world", "quick", "--cache_dir", str(path.parent), "--num_samples", "16", "--max_lines", "3",
              "--half_length", "1.0", "--spacing", "0.25", "--circles", "2", "--circle_points", "24"]
    with pytest.raises(SystemExit):
        transitions.parse_args(["--circles", "9", "--num_samples", "16"])  # a circle takes two noises
    with pytest.raises(SystemExit, match="holds no generator"):
        transitions.main(transitions.parse_args([str(tmp_path / "weights.bin"), *common]))
    # Weights saved from a deepened copy of the teacher (copies start as identities) load into a network as deep as
    # the file says and compute the teacher's one-step function: the untrained generator's row.
    deeper = tmp_path / "deeper.safetensors"
    model = PixArtTransformer2DModel.from_pretrained(path / "transformer")
    common_module.save_weights(common_module.deepen(model, 2), deeper)
    out = tmp_path / "rows.json"
    rows = transitions.main(transitions.parse_args([str(deeper), "--untrained", "--teacher_steps", "2", *common,
                                                    "--out", str(out)]))
    assert list(rows) == ["teacher 2 steps", "untrained one-step generator", str(deeper)]
    assert rows[str(deeper)] == pytest.approx(rows["untrained one-step generator"], nan_ok=True)
    assert json.loads(out.read_text())["rows"].keys() == rows.keys()
    for row in rows.values():
        assert 0.0 <= row["fidelity"] <= 1.0 and 0.0 <= row["circle_off_mode"] <= 1.0
        assert row["band_fraction"] <= row["circle_off_mode"]  # band points are some of the off-mode points
        if row["num_lines"]:
            assert row["median_max_slope"] > 0 and 0.0 <= row["censored"] <= 1.0
