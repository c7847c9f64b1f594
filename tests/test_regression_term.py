"""The teacher-ODE regression term: its targets are the teacher's own DPM-Solver++ samples from the generator's noise
(never the fake score's), and its value and gradient do not depend on how the global batch is split over processes."""

import math

import pytest
import torch
from diffusers import PixArtAlphaPipeline

from sim_diffusers.losses import regression_loss
from sim_diffusers.sampling import ode_scheduler
from sim_diffusers.testing import tiny_pixart_components
from sim_diffusers.training.models import ScoreNetworks
from sim_diffusers.training.step import Conditioning, regression_term, teacher_ode_targets


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_targets_are_the_teacher_pipelines_own_samples(lora_rank):
    pipe = PixArtAlphaPipeline(**tiny_pixart_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    with torch.no_grad():
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, True, negative_prompt="", clean_caption=False)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(
        negative_prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        latents=z.clone(),
        num_inference_steps=4,
        guidance_scale=4.5,
        output_type="latent",
        use_resolution_binning=False,
    ).images

    networks = ScoreNetworks.build(pipe.transformer, lora_rank=lora_rank)
    with torch.no_grad():  # a fake score that differs from the teacher must not leak into the targets
        for name, p in networks.fake_score.named_parameters():
            if lora_rank == 0 or "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    cond = Conditioning(embeds, mask, neg, neg_mask)
    targets = teacher_ode_targets(networks, ode_scheduler(pipe.scheduler), z, cond, 4.5, 4)
    assert torch.allclose(targets, expected, atol=1e-5), (targets - expected).abs().max()
    assert not torch.allclose(targets, z)


def test_ode_scheduler_is_dpm_solver_on_the_teachers_schedule():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    solver = ode_scheduler(ddpm)
    assert isinstance(solver, DPMSolverMultistepScheduler)
    assert torch.equal(solver.alphas_cumprod, ddpm.alphas_cumprod)


def test_regression_term_is_the_same_for_any_split_of_the_global_batch():
    every, global_batch = 2, 4
    torch.manual_seed(0)
    x0 = torch.randn(global_batch, 4, 8, 8, requires_grad=True)
    targets = torch.randn(global_batch, 4, 8, 8)
    selected = [p for p in range(global_batch) if p % every == 0]

    one = regression_term(x0, targets[selected], torch.tensor(selected), global_batch / every)
    (grad_one,) = torch.autograd.grad(one, x0)
    assert torch.allclose(one, regression_loss(x0[selected], targets[selected]).mean())

    # Two processes with 2 samples each (positions 0,1 and 2,3); DDP averages their gradients.
    local_terms = []
    for rank in range(2):
        positions = [2 * rank, 2 * rank + 1]
        index = [i for i, p in enumerate(positions) if p % every == 0]
        local_x0 = x0[2 * rank : 2 * rank + 2]
        local_terms.append(
            regression_term(local_x0, targets[[positions[i] for i in index]], torch.tensor(index), 2 / every)
        )
    split = sum(local_terms) / 2
    (grad_split,) = torch.autograd.grad(split, x0)
    assert torch.allclose(one, split)
    assert torch.allclose(grad_one, grad_split)
    assert grad_one[1].abs().max() == 0 and grad_one[0].abs().max() > 0  # only the selected samples are pulled


def test_a_process_without_selected_samples_contributes_zero_with_a_graph():
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    term = regression_term(x0, None, torch.tensor([], dtype=torch.long), 0.5)
    assert term.item() == 0 and term.requires_grad


def test_pseudo_huber_regression_is_mse_for_small_errors_and_linear_for_large_ones():
    target = torch.zeros(2, 4, 4, 4)
    small, large = torch.full_like(target, 1e-3), torch.full_like(target, 10.0)
    c = 0.5
    assert torch.allclose(regression_loss(small, target, "pseudo_huber", c), regression_loss(small, target), rtol=1e-4)
    # 2c(sqrt(n^2 + c^2) - c)/D with ||d|| = 10 sqrt(D): about 2c ||d|| / D, far below the squared error 100
    expected = 2 * c * (math.sqrt(100 * 64 + c**2) - c) / 64
    assert torch.allclose(regression_loss(large, target, "pseudo_huber", c), torch.full((2,), expected))
    with pytest.raises(ValueError, match="Unknown distance"):
        regression_loss(small, target, "l1")


@pytest.mark.parametrize("distance, commits", [("l2", False), ("pseudo_huber", True)])
def test_which_distance_rewards_blending_two_modes(distance, commits):
    """A noise whose target is mode A with probability 0.7 and B otherwise (what a network that cannot yet separate
    them sees): on the segment from A to B, the squared error is smallest at the blend 0.3, a norm-like distance at
    (within c of) A."""
    a, b = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    s = torch.linspace(0, 1, 101)
    expected = torch.stack(
        [
            0.7 * regression_loss(a + si * (b - a), a, distance, 0.1)
            + 0.3 * regression_loss(a + si * (b - a), b, distance, 0.1)
            for si in s
        ]
    ).squeeze(1)
    best = s[expected.argmin()].item()
    assert best <= 0.01 if commits else abs(best - 0.3) < 0.011
