"""The benchmarks: FLOP counter against torch's, the XL architectures against the published models, and one-iteration
smoke runs of the training-step and inference benchmarks and of the GPU check's orchestration (tiny fixture, CPU)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO as REPO_ROOT
from conftest import component_weights, max_difference, run_trainer, write_captions

from benchmarks import configs


def _torch_counted_forward_flops(model, config, batch_size=2):
    """FLOPs of one forward as torch.utils.flop_counter counts them (math attention, so that it sees the matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sim_diffusers.generator import micro_conditions, predict_eps

    embeds, mask, _, _ = configs.random_text_conditioning(config, batch_size)
    side = config["sample_size"]
    x = torch.randn(batch_size, config["in_channels"], side, side)
    added = micro_conditions(model, batch_size, side * 8, side * 8, x.device, x.dtype)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        predict_eps(model, x, torch.tensor([500]), embeds, mask, added)
    return counter.get_total_flops()


@pytest.mark.parametrize("micro", [False, True], ids=["512-like", "1024-like"])
def test_flop_count_agrees_with_torch_flop_counter(micro):
    from diffusers import PixArtTransformer2DModel

    from sim_diffusers.testing import tiny_transformer_config

    # sample_size 8 keeps the tiny model small also in its 1024-like (micro-conditioned) form.
    config = tiny_transformer_config(micro_conditions=micro, sample_size=8)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**config).eval()
    counted = _torch_counted_forward_flops(model, config)
    ours = configs.transformer_forward_flops(config, batch_size=2)
    assert abs(ours - counted) / counted < 0.03, (ours, counted)


def test_flop_count_with_lora_adapters_agrees_with_torch_flop_counter():
    from sim_diffusers.training.models import ScoreNetworks

    config = configs.transformer_config("tiny")
    networks = ScoreNetworks.build(configs.build_transformer("tiny"), lora_rank=4)
    counted = _torch_counted_forward_flops(networks.fake_score, config)
    ours = configs.transformer_forward_flops(config, batch_size=2, lora_rank=4)
    assert abs(ours - counted) / counted < 0.03, (ours, counted)


def test_xl_configs_are_the_published_architectures():
    """Parameter counts of PixArt-XL-2-512x512 / -1024-MS (610.86 M / 611.35 M); forward FLOPs near 1.24 / 6.5
    TFLOP."""
    for name, params, tflop in (("xl-512", 610.86e6, 1.24), ("xl-1024", 611.35e6, 6.5)):
        model = configs.build_transformer(name, device="meta")
        assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.01e6
        assert abs(configs.transformer_forward_flops(configs.transformer_config(name)) / 1e12 - tflop) / tflop < 0.02


def test_sim_iteration_flop_accounting():
    config = configs.transformer_config("mid")
    f = configs.transformer_forward_flops(config, 2)
    assert configs.sim_iteration_flops(config, 2)["total"] == 12 * f
    assert configs.sim_iteration_flops(config, 2, needs_input_grad=False)["total"] == 9 * f
    assert configs.sim_iteration_flops(config, 2, guidance_scale=1.0)["total"] == 10 * f
    lora = configs.sim_iteration_flops(config, 2, lora_rank=8)
    extra = configs.transformer_forward_flops(config, 2, lora_rank=8) - f
    assert (
        lora["total"] == 11 * f + 5 * extra
    )  # update 2F + 3 x adapters; frozen F in the generator loss 2 x (F + adapters)
    # The default iteration: on average half a sample of the batch of 2 gets a target (one in four), each 8 guided
    # teacher forwards (16 per-sample forwards, so 8 per-sample forwards = 4f), no backward
    assert configs.sim_iteration_flops(config, 2, regression_samples=0.5)["total"] == 12 * f + 4 * f
    # A 4-step generator: on average 1.5 calls per sample run before the trained one, without gradients
    assert configs.sim_iteration_flops(config, 2, generator_steps=4)["total"] == 12 * f + f * 3 // 2
    # The warm-up: no divergence, a target for every sample
    assert (
        configs.sim_iteration_flops(config, 2, regression_samples=2, warmup=True)["total"] == 6 * f + 16 * f
    )  # 22F per sample
    assert configs.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert configs.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert configs.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert configs.peak_bf16_tflops("Some CPU") is None


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The benchmarks pin CPU runs to one thread; give the rest of the suite its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize(
    "extra",
    [
        ["--ablations"],
        ["--precision", "bf16", "--lora_rank", "4", "--gradient_checkpointing", "--divergence", "dmd", "--no_ema"],
    ],
    ids=["fp32-full-copy-ablations", "bf16-lora-checkpointing-dmd"],
)
def test_train_step_benchmark_times_both_phases_of_the_default_iteration(tmp_path, fresh_accelerator_state, extra):
    from benchmarks import train_step

    out = tmp_path / "train.json"
    result = train_step.main(
        train_step.parse_args(["--config", "tiny", "--steps", "1", "--warmup", "0", "--json", str(out), *extra])
    )
    saved = json.loads(out.read_text())
    assert set(result["phases"]) == {"sim", "warmup"}
    sim, warmup = result["phases"]["sim"], result["phases"]["warmup"]
    assert saved["phases"]["sim"]["ms_per_iteration"] == pytest.approx(sim["ms_per_iteration"])
    for phase in (sim, warmup):
        assert phase["ms_per_iteration"] > 0 and phase["samples_per_s"] > 0
        assert phase["overhead_ratio"] > 0 and phase["essential_sum_ms"] > 0
    # Batch 4, one sample in four after the warm-up: one regression target per SIM step, four per warm-up step
    assert sim["regression_targets_per_iteration"] == 1 and warmup["regression_targets_per_iteration"] == 4
    assert {
        "generator_forward",
        "generator_backward",
        "fake_score_update_forward",
        "fake_score_update_backward",
        "teacher_forward",
        "fake_score_forward",
        "regression_targets",
        "fake_score_optimizer_step",
        "generator_optimizer_step",
    } <= set(sim["passes_ms"])
    assert "teacher_forward" not in warmup["passes_ms"] and "regression_targets" in warmup["passes_ms"]
    assert {
        "generator_loss_forward",
        "regression_targets",
        "generator_loss_backward",
        "fake_score_optimizer_step",
    } <= set(sim["segments_ms"])
    assert (
        sim["flops_per_iteration"]["regression_targets"] > 0
        and "teacher_in_generator_loss" not in warmup["flops_per_iteration"]
    )
    assert result["memory"]["static_bytes"]["total"] > 0
    if "--ablations" in extra:
        assert {"teacher_two_forwards_forward", "generator_adamw_unfused", "ema_no_foreach"} <= set(
            result["ablations_ms"]
        )
    else:  # dmd: teacher and fake run under no_grad, so they have no backward pass
        assert "teacher_backward" not in sim["passes_ms"]


@pytest.mark.parametrize("phase", ["warmup", "sim"])
def test_a_benchmark_iteration_is_a_trainer_step(tiny_teacher_path, tmp_path, fresh_accelerator_state, phase):
    """From the same state (the teacher's weights, fresh optimisers) and the same samples, one iteration of the step
    benchmark and one step of the trainer give the same generator and fake score, in each phase: what the benchmark
    times is the trainer's iteration."""
    from diffusers import PixArtAlphaPipeline

    from benchmarks import train_step
    from sim_diffusers.training.captions import CaptionStream
    from sim_diffusers.training.iteration import IterationConfig
    from sim_diffusers.training.run import OptimizerConfig, StepBatches
    from sim_diffusers.training.text_embeddings import OnlineTextEncoder

    captions = ["a red cat", "a blue dog", "a green bird", "a small house", "a big tree"]
    warmup_steps = 1 if phase == "warmup" else 0
    optimisation = ["--learning_rate", "1e-2", "--fake_score_learning_rate", "1e-2", "--adam_epsilon", "1.0"]
    run_trainer(
        tiny_teacher_path,
        write_captions(tmp_path / "captions.txt", captions),
        tmp_path / "run",
        "--max_train_steps",
        "1",
        "--train_batch_size",
        "4",
        "--seed",
        "5",
        "--report_to",
        "none",
        "--checkpointing_steps",
        "1",
        "--regression_warmup_steps",
        str(warmup_steps),
        *optimisation,
    )

    args = train_step.parse_args(["--config", "tiny", "--no_ema", "--batch_size", "4", "--num_threads", "1"])
    train_step.set_cpu_threads(args)
    teacher = PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)
    stream = CaptionStream(captions, seed=5, global_batch_size=4, t_min=20, t_max=979)
    text = OnlineTextEncoder(teacher, "cpu", torch.float32, 120, True)
    batch = StepBatches(stream, text, teacher.transformer, 64, (4, 8, 8), 4, 1, 0, 1, "cpu", torch.float32)(0)[0]
    s = train_step.build(
        args,
        teacher,
        IterationConfig(regression_warmup_steps=warmup_steps),
        OptimizerConfig(learning_rate=1e-2, fake_score_learning_rate=1e-2, adam_epsilon=1.0),
        batch,
    )
    result = train_step.run_iteration(s, 0)
    assert result.warming_up == (phase == "warmup")
    assert result.regression_loss is not None and result.generator_finite and result.fake_score_finite

    trained = component_weights(tmp_path / "run")
    benchmark = {k: v.detach() for k, v in s.models.generator.state_dict().items()}
    assert max_difference(trained, component_weights(tiny_teacher_path)) > 1e-4  # the step did change G
    assert max_difference(trained, benchmark) == 0.0
    fake = component_weights(tmp_path / "run" / "checkpoint-1", "fake_score")
    assert max_difference(fake, {k: v.detach() for k, v in s.models.fake_score.state_dict().items()}) == 0.0


def test_inference_benchmark_runs_both_pipelines(tmp_path):
    from benchmarks import inference

    out = tmp_path / "inference.json"
    result = inference.main(
        inference.parse_args(
            [
                "--config",
                "tiny",
                "--batch_sizes",
                "1",
                "2",
                "--teacher_steps",
                "2",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--cached_prompt_embeddings",
                "--tiny_vae",
                "--json",
                str(out),
            ]
        )
    )
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert [(r["pipeline"], r["batch_size"]) for r in result["rows"]] == [
        ("sim_one_step", 1),
        ("pixart_alpha", 1),
        ("sim_one_step", 2),
        ("pixart_alpha", 2),
    ]
    one_step, teacher = result["rows"][:2]
    assert one_step["calls"]["transformer"] == 1 and teacher["calls"]["transformer"] == 2
    assert one_step["calls"]["text_encoder"] == 0  # cached embeddings: T5 never runs
    assert one_step["calls"]["vae_decode"] >= 1


def test_gpu_check_orchestration_smoke(tmp_path):
    """The GPU check's job runner, JSON and markdown, with its tiny CPU jobs."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert {k: v["status"] for k, v in results.items()} == {"train_tiny": "ok", "inference_tiny": "ok"}
    table = (tmp_path / "gpu_results.md").read_text()
    assert "| train_tiny | sim |" in table and "| train_tiny | warmup |" in table
    assert "| inference_tiny | sim_one_step | 1 | 1 |" in table
    assert (tmp_path / "gpu_check.log").stat().st_size > 0


def test_validation_cost_benchmark_times_the_trainers_validation(tmp_path, fresh_accelerator_state):
    from benchmarks import validation_cost

    argv = ["--config", "tiny", "--num_prompts", "2", "--num_samples", "4", "--teacher_steps", "2", "--rounds", "1"]
    results = {}
    for k in (1, 2):
        out = tmp_path / f"cost-{k}.json"
        results[k] = validation_cost.main(
            validation_cost.parse_args([*argv, "--num_generator_steps", str(k), "--json", str(out)])
        )
        assert json.loads(out.read_text()) == results[k]
        assert results[k]["validation_seconds"] > 0 and results[k]["teacher_samples_seconds"] > 0
        assert results[k]["share_of_training_at_default_frequency"] == pytest.approx(
            results[k]["validation_seconds"] / (500 * results[k]["step_seconds"])
        )
    # a 2-step generator's validation makes twice the generator calls; the teacher's samples do not depend on K
    assert results[2]["validation_transformer_tflop"] == pytest.approx(2 * results[1]["validation_transformer_tflop"])
    assert results[2]["teacher_samples_tflop"] == pytest.approx(results[1]["teacher_samples_tflop"])
