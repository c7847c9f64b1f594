"""The benchmarks: FLOP counter against torch's, the XL architectures against the published models, and one-iteration
smoke runs of the training-step and inference benchmarks and of the GPU check's orchestration (tiny fixture, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import configs  # noqa: E402


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
    """Parameter counts of PixArt-XL-2-512x512 / -1024-MS (610.86 M / 611.35 M); forward FLOPs near 1.24 / 6.5 TFLOP."""
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
    assert lora["total"] == 11 * f + 5 * extra  # update 2F + 3 x adapters; frozen F in the generator loss 2 x (F + adapters)
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
    [["--ablations"], ["--precision", "bf16", "--lora_rank", "4", "--gradient_checkpointing", "--divergence", "dmd", "--no_ema"]],
    ids=["fp32-full-copy-ablations", "bf16-lora-checkpointing-dmd"],
)
def test_train_step_benchmark_runs_one_iteration(tmp_path, fresh_accelerator_state, extra):
    from benchmarks import train_step

    out = tmp_path / "train.json"
    result = train_step.main(train_step.parse_args(["--config", "tiny", "--steps", "1", "--warmup", "0", "--json", str(out), *extra]))
    saved = json.loads(out.read_text())
    assert saved["ms_per_iteration"] == pytest.approx(result["ms_per_iteration"])
    assert result["ms_per_iteration"] > 0 and result["samples_per_s"] > 0
    assert result["overhead_ratio"] > 0 and result["essential_sum_ms"] > 0
    assert {"generator_forward", "generator_backward", "fake_score_update_forward", "fake_score_update_backward",
            "teacher_forward", "fake_score_forward", "fake_score_optimizer_step", "generator_optimizer_step"} <= set(result["passes_ms"])
    assert {"generator_loss_forward", "generator_loss_backward", "fake_score_optimizer_step"} <= set(result["segments_ms"])
    assert result["memory"]["static_bytes"]["total"] > 0
    if "--ablations" in extra:
        assert {"ablation_iteration_recomputed_x0", "ablation_teacher_two_forwards_forward"} <= set(result["ablations_ms"])
    else:  # dmd: teacher and fake run under no_grad, so they have no backward pass
        assert "teacher_backward" not in result["passes_ms"]


def test_inference_benchmark_runs_both_pipelines(tmp_path):
    from benchmarks import inference

    out = tmp_path / "inference.json"
    result = inference.main(inference.parse_args([
        "--config", "tiny", "--batch_sizes", "1", "2", "--teacher_steps", "2", "--runs", "1", "--warmup", "0",
        "--cached_prompt_embeddings", "--tiny_vae", "--json", str(out),
    ]))
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert [(r["pipeline"], r["batch_size"]) for r in result["rows"]] == [
        ("sim_one_step", 1), ("pixart_alpha", 1), ("sim_one_step", 2), ("pixart_alpha", 2)]
    one_step, teacher = result["rows"][:2]
    assert one_step["calls"]["transformer"] == 1 and teacher["calls"]["transformer"] == 2
    assert one_step["calls"]["text_encoder"] == 0  # cached embeddings: T5 never runs
    assert one_step["calls"]["vae_decode"] >= 1


def test_gpu_check_orchestration_smoke(tmp_path):
    """The GPU check's job runner, JSON and markdown, with its tiny CPU jobs."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert {k: v["status"] for k, v in results.items()} == {"train_tiny": "ok", "inference_tiny": "ok"}
    table = (tmp_path / "gpu_results.md").read_text()
    assert "| train_tiny |" in table and "| inference_tiny | sim_one_step | 1 | 1 |" in table
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
