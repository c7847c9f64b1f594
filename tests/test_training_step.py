"""The SIM iteration's stop-gradient structure on real PixArt transformers: what gets gradients, through which path,
with a full or LoRA fake score, with and without activation checkpointing."""

import copy

import pytest
import torch

from sim_diffusers.generator import one_step_generate
from sim_diffusers.losses import get_divergence
from sim_diffusers.schedule import alphas_cumprod_of
from sim_diffusers.testing import tiny_pixart_components
from sim_diffusers.training.models import ScoreNetworks
from sim_diffusers.training.step import Conditioning, fake_score_update_loss, generator_update_loss


@pytest.fixture
def parts():
    components = tiny_pixart_components(seed=0)
    teacher = components["transformer"]
    generator = copy.deepcopy(teacher).requires_grad_(True)
    torch.manual_seed(1)
    cond = Conditioning(
        torch.randn(2, 6, 32),
        torch.ones(2, 6, dtype=torch.long),
        torch.randn(2, 6, 32),
        torch.ones(2, 6, dtype=torch.long),
    )
    return teacher, generator, cond, alphas_cumprod_of(components["scheduler"])


def generator_step(networks, generator, cond, alphas_cumprod, divergence="sim", seed=0):
    g = torch.Generator().manual_seed(seed)
    z, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x0 = one_step_generate(generator, z, 440, alphas_cumprod, cond.prompt_embeds, cond.prompt_attention_mask)
    x0.retain_grad()
    loss, _ = generator_update_loss(
        networks, x0, torch.tensor([300, 700]), noise, cond, alphas_cumprod, get_divergence(divergence), 4.5, "sigma2"
    )
    loss.backward()
    return x0.grad


def perturb_lora(networks):
    with torch.no_grad():
        for name, p in networks.fake_score.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_generator_step_reaches_only_the_generator(parts, lora_rank):
    teacher, generator, cond, alphas_cumprod = parts
    networks = ScoreNetworks.build(teacher, lora_rank=lora_rank)
    perturb_lora(networks)
    generator_step(networks, generator, cond, alphas_cumprod)
    assert all(p.grad is not None for p in generator.parameters() if p.requires_grad)
    assert max(p.grad.abs().max() for p in generator.parameters()) > 0
    assert all(p.grad is None for p in networks.fake_score.parameters())
    assert all(p.requires_grad for p in networks.fake_score_parameters())  # unfrozen again for F's own update


def test_sim_gradient_flows_through_the_teacher_and_dmd_does_not(parts):
    teacher, generator, cond, alphas_cumprod = parts
    networks = ScoreNetworks.build(teacher)
    with torch.no_grad():  # a fake score that differs from the teacher, as during training
        for p in networks.fake_score.parameters():
            p.add_(0.02 * torch.randn_like(p))
    grad_sim = generator_step(networks, generator, cond, alphas_cumprod, "sim")

    class NoInputGradTeacher(ScoreNetworks):
        def teacher_eps(self, *args, **kwargs):
            return super().teacher_eps(*args, **kwargs).detach()

    detached = NoInputGradTeacher(networks.teacher, networks.fake_score, lora=False)
    grad_detached = generator_step(detached, generator, cond, alphas_cumprod, "sim")
    assert (
        grad_sim - grad_detached
    ).abs().max() > 1e-3 * grad_sim.abs().max()  # the teacher path is in SIM's gradient
    assert not get_divergence("dmd").needs_input_grad and get_divergence("sim").needs_input_grad
    generator_step(networks, generator, cond, alphas_cumprod, "dmd")  # runs with teacher and F under no_grad


def test_lora_teacher_mode_is_the_untouched_teacher(parts):
    teacher, _, cond, _ = parts
    reference = copy.deepcopy(teacher)
    networks = ScoreNetworks.build(teacher, lora_rank=4)
    perturb_lora(networks)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    with torch.no_grad():
        eps_teacher = networks.teacher_eps(x, t, cond.cond, cond.uncond, 4.5)
        eps_reference = networks.teacher_eps.__func__(
            ScoreNetworks(reference, reference, lora=False), x, t, cond.cond, cond.uncond, 4.5
        )
        eps_fake = networks.fake_eps(x, t, cond.cond)
        eps_base = ScoreNetworks(reference, reference, lora=False).fake_eps(x, t, cond.cond)
    torch.testing.assert_close(eps_teacher, eps_reference)
    assert (eps_fake - eps_base).abs().max() > 1e-4  # F is the teacher plus its adapters


def test_lora_fake_score_starts_from_the_seed_alone(parts):
    """The adapters' initial weights depend on the run's seed, not on whatever state torch's global generator is in."""
    teacher = parts[0]

    def adapters(seed, global_seed):
        torch.manual_seed(global_seed)
        networks = ScoreNetworks.build(copy.deepcopy(teacher), lora_rank=4, seed=seed)
        return torch.cat([p.detach().flatten() for p in networks.fake_score_parameters()])

    assert torch.equal(adapters(0, global_seed=1), adapters(0, global_seed=2))
    assert not torch.equal(adapters(0, global_seed=1), adapters(1, global_seed=1))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_activation_checkpointing_gives_the_same_gradients(parts, lora_rank):
    teacher, generator, cond, alphas_cumprod = parts
    plain = ScoreNetworks.build(copy.deepcopy(teacher), lora_rank=lora_rank)
    perturb_lora(plain)
    checkpointed = ScoreNetworks.build(copy.deepcopy(teacher), lora_rank=lora_rank)
    checkpointed.fake_score.load_state_dict(plain.fake_score.state_dict())
    checkpointed.enable_gradient_checkpointing()
    generator.train()
    grad_plain = generator_step(plain, generator, cond, alphas_cumprod)
    grads_plain = [p.grad.clone() for p in generator.parameters()]
    generator.zero_grad(set_to_none=True)
    checkpointed.fake_score.train()
    grad_ckpt = generator_step(checkpointed, generator, cond, alphas_cumprod)
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-4, atol=1e-6)
    for a, p in zip(grads_plain, generator.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    # F's own update under checkpointing trains F only.
    x0 = torch.randn(2, 4, 8, 8)
    fake_score_update_loss(
        checkpointed, None, x0, torch.tensor([50, 900]), torch.randn(2, 4, 8, 8), cond, alphas_cumprod
    ).backward()
    assert all(p.grad is not None for p in checkpointed.fake_score_parameters())
