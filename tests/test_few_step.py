"""K-step generators: the mapping (`generator.few_step_generate`), its backward simulation in training, the pipeline
(`num_inference_steps`, equal to stock PixArtAlphaPipeline + LCMScheduler), and the trainer's options."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import max_difference, perturb, run_trainer, write_captions

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.generator import (
    backward_simulation,
    default_generator_timesteps,
    few_step_generate,
    one_step_generate,
    predict_eps,
)
from sim_diffusers.schedule import alphas_cumprod_of
from sim_diffusers.testing import tiny_pixart_components, tiny_transformer
from sim_diffusers.training.captions import CaptionStream


@pytest.fixture(scope="module")
def parts():
    from diffusers import DDPMScheduler

    components = tiny_pixart_components(seed=0)
    transformer = perturb(components["transformer"], seed=1)
    alphas_cumprod = alphas_cumprod_of(DDPMScheduler.from_config(components["scheduler"].config))
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(3, 6, 32, generator=g), torch.ones(3, 6, dtype=torch.long)
    return transformer, alphas_cumprod, embeds, mask


def test_two_step_mapping_is_the_hand_computed_chain(parts):
    transformer, abar, embeds, mask = parts
    g = torch.Generator().manual_seed(1)
    z, eps2 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        x1 = (1 - abar[440]).sqrt() * z
        x0_1 = (x1 - (1 - abar[440]).sqrt() * predict_eps(transformer, x1, 440, embeds, mask)) / abar[440].sqrt()
        x2 = abar[220].sqrt() * x0_1 + (1 - abar[220]).sqrt() * eps2
        x0_2 = (x2 - (1 - abar[220]).sqrt() * predict_eps(transformer, x2, 220, embeds, mask)) / abar[220].sqrt()
        ours = few_step_generate(transformer, z, [440, 220], abar, embeds, mask, fresh_noise=[eps2])
        drawn = few_step_generate(transformer, z, [440, 220], abar, embeds, mask, fresh_noise=lambda k: eps2)
        one = one_step_generate(transformer, z, 440, abar, embeds, mask)
    torch.testing.assert_close(ours, x0_2, rtol=0, atol=1e-6)
    assert torch.equal(ours, drawn)
    torch.testing.assert_close(few_step_generate(transformer, z, [440], abar, embeds, mask), one, rtol=0, atol=0)
    assert (ours - one).abs().max() > 1e-3  # the second call changes the sample
    with pytest.raises(ValueError, match="fresh noise"):
        few_step_generate(transformer, z, [440, 220], abar, embeds, mask)


def test_default_timesteps_start_at_t_star_and_bad_counts_fail():
    assert default_generator_timesteps(440, 1) == [440]
    assert default_generator_timesteps(440, 2) == [440, 220]
    assert default_generator_timesteps(440, 4) == [440, 330, 220, 110]
    with pytest.raises(ValueError, match=">= 1"):
        default_generator_timesteps(440, 0)


def test_backward_simulation_trains_each_samples_drawn_call_only(parts):
    transformer, abar, embeds, mask = parts
    timesteps = [440, 330, 220, 110]
    g = torch.Generator().manual_seed(2)
    z, fresh = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 3, 4, 8, 8, generator=g)
    trained = torch.tensor([2, 0, 3])
    out = backward_simulation(transformer, z, timesteps, abar, embeds, mask, None, fresh, trained)
    for i, k in enumerate(trained.tolist()):
        with torch.no_grad():
            expected = few_step_generate(
                transformer,
                z[i : i + 1],
                timesteps[: k + 1],
                abar,
                embeds[i : i + 1],
                mask[i : i + 1],
                fresh_noise=fresh[i : i + 1].unbind(1),
            )
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    # The gradient reaches the weights through the trained call alone: a sample whose earlier calls are simulated
    # gets the same weight gradient as the same call on that (fixed) input.
    params = [p for p in transformer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out[0].sum(), params)
    with torch.no_grad():
        x_in = few_step_generate(
            transformer, z[:1], timesteps[:2], abar, embeds[:1], mask[:1], fresh_noise=fresh[:1].unbind(1)
        )
        x_t = abar[220].sqrt() * x_in + (1 - abar[220]).sqrt() * fresh[:1, 1]
    eps = predict_eps(transformer, x_t, 220, embeds[:1], mask[:1])
    direct = torch.autograd.grad(((x_t - (1 - abar[220]).sqrt() * eps) / abar[220].sqrt()).sum(), params)
    assert max((a - b).abs().max().item() for a, b in zip(grads, direct)) < 1e-5


def test_backward_simulation_draws_the_same_samples_for_any_process_split():
    """The trained call comes from the step, each sample's fresh noise from its global position: one process with
    batch 4 and two with batch 2 draw the same; the one-step generator's draws do not change when K > 1."""
    stream = CaptionStream(["a", "b", "c"], seed=7, global_batch_size=4, t_min=20, t_max=979, generator_steps=4)
    _, whole = stream.batch(5, 0, 4, 0, 1, (4, 8, 8))
    halves = [stream.batch(5, 0, 2, rank, 2, (4, 8, 8))[1] for rank in range(2)]
    for name in ("noise", "generator_timesteps", "generator_step", "fresh_noise"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    assert whole.fresh_noise.shape == (4, 3, 4, 8, 8)
    # One trained call per step, the same for every sample and process; over steps, every call is trained
    assert len(set(whole.generator_step.tolist())) == 1
    assert {stream.generator_step(step) for step in range(40)} == {0, 1, 2, 3}
    one_step = CaptionStream(["a", "b", "c"], seed=7, global_batch_size=4, t_min=20, t_max=979)
    _, single = one_step.batch(5, 0, 4, 0, 1, (4, 8, 8))
    assert single.generator_step is None and single.fresh_noise is None
    for name in ("noise", "fake_timesteps", "fake_noise", "generator_timesteps", "generator_noise"):
        assert torch.equal(getattr(whole, name), getattr(single, name))


def test_pipeline_equals_stock_pixart_with_lcm_scheduler_and_keeps_its_timesteps(tmp_path):
    """A K-step generator is LCM's multistep sampling without its boundary-condition blend: a stock
    PixArtAlphaPipeline with LCMScheduler (timestep_scaling so large that c_skip vanishes in float32) at the same
    timesteps, guidance 1 and latents sigma_{t*} z, drawing its fresh noise from the same generator, gives the same
    images; save/load keeps the timesteps; fewer steps use the first ones."""
    from diffusers import LCMScheduler, PixArtAlphaPipeline

    components = tiny_pixart_components(seed=3)
    components["transformer"] = perturb(tiny_transformer(seed=5), seed=6)
    teacher = PixArtAlphaPipeline(**components)
    pipe = SIMOneStepPipeline.from_teacher(teacher, generator_timesteps=[440, 220])
    assert pipe.generator_timesteps == [440, 220] and pipe.conditioning_timestep == 440
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a blue dog"]
    ours = pipe(prompts, latents=z, generator=torch.Generator().manual_seed(9), output_type="latent").images

    lcm = LCMScheduler.from_config(teacher.scheduler.config, timestep_scaling=1e9, clip_sample=False)
    stock = PixArtAlphaPipeline(**{**components, "transformer": pipe.transformer, "scheduler": lcm})
    sigma = (1 - lcm.alphas_cumprod[440]).sqrt()
    reference = stock(
        prompts,
        timesteps=[440, 220],
        guidance_scale=1.0,
        latents=sigma * z,
        output_type="latent",
        generator=torch.Generator().manual_seed(9),
        use_resolution_binning=False,
    ).images
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    pipe.save_pretrained(tmp_path / "k2")
    loaded = SIMOneStepPipeline.from_pretrained(tmp_path / "k2")
    assert loaded.generator_timesteps == [440, 220]
    one = loaded(prompts, latents=z, num_inference_steps=1, output_type="latent").images
    torch.testing.assert_close(
        one, SIMOneStepPipeline.from_teacher(teacher)(prompts, latents=z, output_type="latent").images
    )
    with pytest.raises(ValueError, match="between 1 and 2"):
        loaded(prompts, latents=z, num_inference_steps=3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        SIMOneStepPipeline.from_teacher(teacher, generator_timesteps=[440, 500])


def test_trainer_trains_and_saves_a_two_step_generator(tiny_teacher_path, tmp_path):
    captions = write_captions(tmp_path / "captions.txt", ["a red cat", "a blue dog", "a green bird"])
    args = [
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--report_to",
        "none",
        "--checkpointing_steps",
        "2",
        "--regression_warmup_steps",
        "1",
        "--learning_rate",
        "1e-2",
        "--fake_score_learning_rate",
        "1e-2",
        "--adam_epsilon",
        "1.0",
    ]
    validation = ["--validation_prompts", "a red cat", "--validation_num_samples", "4", "--validation_steps", "2"]
    run_trainer(tiny_teacher_path, captions, tmp_path / "k2", *args, "--num_generator_steps", "2", *validation)
    validated = [json.loads(line) for line in (tmp_path / "k2" / "logs" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validated] == [0, 2]  # the validation samples the 2-step generator (test below)
    pipe = SIMOneStepPipeline.from_pretrained(tmp_path / "k2")
    assert pipe.generator_timesteps == [440, 220]
    assert json.loads((tmp_path / "k2" / "model_index.json").read_text())["generator_timesteps"] == [440, 220]
    card = (tmp_path / "k2" / "README.md").read_text()
    assert "**2-step**" in card and "num_inference_steps=1 .. 2" in card
    run_trainer(tiny_teacher_path, captions, tmp_path / "k1", *args)
    from conftest import component_weights

    teacher = component_weights(tiny_teacher_path)
    k1, k2 = component_weights(tmp_path / "k1"), component_weights(tmp_path / "k2")
    assert max_difference(k2, teacher) > 1e-4 and max_difference(k1, k2) > 1e-6  # backward simulation trained


def test_validation_samples_a_k_step_generator_with_fixed_draws(parts):
    """The trainer's validation runs the generator it trains: K calls, with fresh noises fixed by (seed, prompt,
    step) so that every validation of a run compares like with like."""
    from sim_diffusers.training.validation import ValidationSet, generator_samples, step_noise, validation_noise

    transformer, abar, embeds, mask = parts
    validation = ValidationSet(["a", "b"], embeds[:2], mask[:2], embeds[2:], mask[2:])
    noise = validation_noise(7, 2, 3, (4, 8, 8))

    def samples(timesteps):
        return generator_samples(transformer, noise, validation, timesteps, abar, lambda n: None, "cpu", seed=7)

    with torch.no_grad():
        two, one = samples([440, 220]), samples([440])
        for p in range(2):
            cond = (embeds[p : p + 1].expand(3, -1, -1), mask[p : p + 1].expand(3, -1))
            eps2 = step_noise(7, p, 1, noise[p].shape)
            expected = few_step_generate(transformer, noise[p], [440, 220], abar, *cond, fresh_noise=[eps2])
            torch.testing.assert_close(two[p], expected, rtol=0, atol=0)
            torch.testing.assert_close(one[p], one_step_generate(transformer, noise[p], 440, abar, *cond))
    assert torch.equal(samples([440, 220]), two)
    assert not torch.equal(step_noise(7, 0, 1, (4, 8, 8)), step_noise(7, 1, 1, (4, 8, 8)))
    assert (two - one).abs().max() > 1e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_generator_steps", "0"], "--num_generator_steps must be >= 1"),
        (["--generator_timesteps", "440", "500"], "strictly decreasing"),
        (["--generator_timesteps", "440", "220", "--num_generator_steps", "3"], "gives 2 timesteps"),
        (["--generator_timesteps", "1200", "300"], "must lie in [1, 999]"),
        (["--generator_timesteps", "440", "220", "--conditioning_timestep", "400"], "must start at"),
    ],
)
def test_bad_generator_steps_fail_before_any_model_loads(tiny_teacher_path, tmp_path, capsys, argv, message):
    from conftest import load_trainer_module

    trainer = load_trainer_module()
    captions = write_captions(tmp_path / "captions.txt", ["a red cat"])
    args = trainer.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_teacher_path),
            "--caption_file",
            str(captions),
            "--dry_run",
            *argv,
        ]
    )
    assert trainer.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
