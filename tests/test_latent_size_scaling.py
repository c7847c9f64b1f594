"""The generator's terms keep their balance at every latent size (docs/objective.md, "How the terms scale with the
latent size"): on Gaussians, where every latent element is alike, the gradients the trainer's iteration sends to x0
are computed at D = 256 (4x8x8, where the defaults were chosen), 4,096 (4x32x32) and 16,384 (4x64x64, PixArt-512's
latents).

Why the tolerance is 10%: teacher, fake score and generator are isotropic Gaussians and every sample keeps its
timestep and noise statistics at every size, so the only thing that changes with D is how many identically
distributed elements each norm sums; the Monte-Carlo spread of a ratio of two such norms over B x D >= 8,192
elements is ~1-2%, and the effect the test must see (the unnormalised regression's pull falling like 1/sqrt(D)) is
a factor 4 at D = 4,096 and 8 at D = 16,384.
"""

from __future__ import annotations

import math

import pytest
import torch

from sim_diffusers.losses import DIVERGENCES
from sim_diffusers.schedule import alphas_cumprod_of
from sim_diffusers.training.captions import SampleRandomness
from sim_diffusers.training.iteration import IterationConfig, MicroBatch, SIMIteration, TrainingModels
from sim_diffusers.training.models import ScoreNetworks
from sim_diffusers.training.step import Conditioning

SIDES = (8, 32, 64)  # D = 4 x side^2 = 256, 4096, 16384
BATCH = 32
TOLERANCE = 0.10


class GaussianEpsilon(torch.nn.Module):
    """The exact epsilon of data N(mean, std^2 I) under the VP schedule, with PixArtTransformer2DModel's call
    signature (its second, learned-sigma half of the channels is zeros, as predict_eps drops it)."""

    def __init__(self, mean: float, std: float, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None, **_):
        alphabar = self.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1)
        alpha, sigma = alphabar.sqrt(), (1 - alphabar).sqrt()
        eps = sigma * (x - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)
        return (torch.cat([eps, torch.zeros_like(eps)], dim=1),)


def x0_gradients(side: int, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the divergence, gradient of the weighted regression term) on x0, as `SIMIteration` computes
    them, for a generator N(0.3, 0.7^2) (its fake score exact) distilling a teacher N(0.5, 0.5^2)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from sim_diffusers.sampling import ode_scheduler

    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    alphas_cumprod = alphas_cumprod_of(DDPMScheduler.from_config(scheduler.config))
    teacher, fake = GaussianEpsilon(0.5, 0.5, alphas_cumprod), GaussianEpsilon(0.3, 0.7, alphas_cumprod)
    networks = ScoreNetworks(teacher, fake, lora=False)
    models = TrainingModels(torch.nn.Linear(1, 1), networks, fake, None, None, None, None)

    g = torch.Generator().manual_seed(0)
    shape = (BATCH, 4, side, side)
    timesteps = torch.linspace(20, 979, BATCH).long()  # the same timesteps at every size
    rnd = SampleRandomness(
        torch.randn(shape, generator=g),
        timesteps,
        torch.randn(shape, generator=g),
        timesteps.flip(0),
        torch.randn(shape, generator=g),
    )
    embeds, mask = torch.zeros(BATCH, 1, 1), torch.ones(BATCH, 1, dtype=torch.long)
    batch = MicroBatch(Conditioning(embeds, mask, embeds, mask), rnd, range(BATCH))
    x0 = (0.3 + 0.7 * rnd.noise).requires_grad_(True)  # the generator's samples from its own noise z

    def gradient(regression_loss_weight):
        settings = dict(guidance_scale=1.0, regression_warmup_steps=0, **config)
        iteration = SIMIteration(
            IterationConfig(regression_loss_weight=regression_loss_weight, **settings),
            440,
            alphas_cumprod,
            ode_scheduler(scheduler),
        )
        loss, _ = iteration.generator_loss(0, models, batch, x0, warming_up=False)
        return torch.autograd.grad(loss, x0)[0]

    divergence = gradient(0.0)
    return divergence, gradient(1.0) - divergence


def assert_balance_is_size_independent(**config) -> None:
    ratios = {}
    for side in SIDES:
        divergence, regression = x0_gradients(side, **config)
        ratios[side] = float(regression.norm() / divergence.norm())
    reference = ratios[SIDES[0]]
    for side in SIDES[1:]:
        assert ratios[side] / reference == pytest.approx(1.0, abs=TOLERANCE), ratios


def test_regression_to_divergence_balance_is_the_same_at_every_latent_size():
    assert_balance_is_size_independent()


def test_the_unnormalised_terms_lose_their_balance_as_the_latent_grows():
    """The same check fails without the normalisation, and by the factor the derivation predicts (sqrt(D / 256))."""
    with pytest.raises(AssertionError):
        assert_balance_is_size_independent(latent_size_normalisation=False)
    divergence, regression = x0_gradients(SIDES[0], latent_size_normalisation=False)
    small = float(regression.norm() / divergence.norm())
    divergence, regression = x0_gradients(SIDES[-1], latent_size_normalisation=False)
    large = float(regression.norm() / divergence.norm())
    assert large / small == pytest.approx(1 / math.sqrt(4 * SIDES[-1] ** 2 / 256), rel=TOLERANCE)


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_each_divergence_pulls_on_x0_alike_at_every_latent_size(divergence):
    """The divergence's own x0-gradient norm, scaled by its factor, is the same at every size (the exponent each
    divergence declares is right)."""
    norms = [float(x0_gradients(side, divergence=divergence)[0].norm()) for side in SIDES]
    for norm in norms[1:]:
        assert norm / norms[0] == pytest.approx(1.0, abs=TOLERANCE), norms
