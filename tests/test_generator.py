"""The schedule helpers and the one-step generator mapping against explicit arithmetic."""

import pytest
import torch
from diffusers import DDPMScheduler

from sim_diffusers.generator import guided_eps, one_step_generate, predict_eps
from sim_diffusers.schedule import alpha_sigma, timestep_for_ve_sigma, ve_sigma


def pixart_alphas_cumprod():
    return DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod


class RecordingTransformer(torch.nn.Module):
    """Stands in for a PixArt transformer: eps = 0.5 x + bias(t, c), plus 4 'learned sigma' channels of junk."""

    def __init__(self, in_channels=4):
        super().__init__()
        self.config = type("Config", (), {"in_channels": in_channels, "sample_size": 8})()
        self.use_additional_conditions = False
        self.calls = []

    def forward(self, x, encoder_hidden_states, encoder_attention_mask, timestep, added_cond_kwargs, return_dict):
        self.calls.append(dict(x=x, t=timestep, c=encoder_hidden_states))
        bias = timestep.float().view(-1, 1, 1, 1) / 1000 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        eps = 0.5 * x + bias
        return (torch.cat([eps, torch.full_like(eps, 1e6)], dim=1),)


def test_default_conditioning_timestep_is_ve_sigma_2_5_of_pixart_schedule():
    alphas_cumprod = pixart_alphas_cumprod()
    t_star = timestep_for_ve_sigma(alphas_cumprod, 2.5)
    assert t_star == 440
    sigmas = ve_sigma(alphas_cumprod)
    assert abs(sigmas[t_star] - 2.5) <= min(abs(sigmas[t_star - 1] - 2.5), abs(sigmas[t_star + 1] - 2.5))
    assert timestep_for_ve_sigma(alphas_cumprod, 1.0) < t_star < timestep_for_ve_sigma(alphas_cumprod, 5.0)


def test_alpha_sigma_is_variance_preserving():
    alphas_cumprod = pixart_alphas_cumprod()
    alpha, sigma = alpha_sigma(alphas_cumprod, torch.tensor([0, 440, 999]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))
    torch.testing.assert_close(alpha**2, alphas_cumprod[[0, 440, 999]])


def test_one_step_generate_is_the_eps_to_x0_conversion_at_t_star():
    alphas_cumprod = pixart_alphas_cumprod()
    net = RecordingTransformer()
    z = torch.randn(3, 4, 8, 8)
    c = torch.randn(3, 5, 16)
    t_star = 440
    x0 = one_step_generate(net, z, t_star, alphas_cumprod, c, torch.ones(3, 5))

    abar = alphas_cumprod[t_star]
    x_in = (1 - abar).sqrt() * z
    (call,) = net.calls
    torch.testing.assert_close(call["x"], x_in)  # zero signal, noise at the level of t*
    assert call["t"].tolist() == [t_star] * 3
    eps_hat = 0.5 * x_in + t_star / 1000 + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # learned-sigma junk dropped
    torch.testing.assert_close(x0, (x_in - (1 - abar).sqrt() * eps_hat) / abar.sqrt())


def test_guided_eps_is_one_batched_forward_with_unconditional_half_first():
    net = RecordingTransformer()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    cond, uncond = torch.randn(2, 5, 16), torch.zeros(2, 5, 16)
    mask = torch.ones(2, 5)
    eps = guided_eps(net, x, t, cond, mask, uncond, mask, guidance_scale=4.5)
    assert len(net.calls) == 1
    assert net.calls[0]["x"].shape[0] == 4 and net.calls[0]["t"].tolist() == [100, 700, 100, 700]
    torch.testing.assert_close(net.calls[0]["c"][:2], uncond)
    eps_c = predict_eps(net, x, t, cond, mask)
    eps_u = predict_eps(net, x, t, uncond, mask)
    torch.testing.assert_close(eps, eps_u + 4.5 * (eps_c - eps_u))
    net.calls.clear()
    torch.testing.assert_close(guided_eps(net, x, t, cond, mask, uncond, mask, guidance_scale=1.0), eps_c)
    assert len(net.calls) == 1 and net.calls[0]["x"].shape[0] == 2  # no wasted unconditional branch at g = 1


def test_generator_mapping_is_differentiable_in_the_transformer():
    alphas_cumprod = pixart_alphas_cumprod()
    lin = torch.nn.Conv2d(4, 8, 1)

    class Net(RecordingTransformer):
        def forward(self, x, **kwargs):
            return (lin(x),)

    x0 = one_step_generate(
        Net(), torch.randn(2, 4, 8, 8), 440, alphas_cumprod, torch.randn(2, 5, 16), torch.ones(2, 5)
    )
    x0.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad[:4].abs().sum() > 0
    assert lin.weight.grad[4:].abs().sum() == 0  # learned-sigma outputs get no gradient


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_ve_sigma_must_be_positive(sigma):
    with pytest.raises(ValueError, match="positive"):
        timestep_for_ve_sigma(pixart_alphas_cumprod(), sigma)
