"""A 2-D Gaussian-mixture distillation harness for the generator divergences of `sim_diffusers.losses`.

The teacher is a Gaussian mixture whose diffused epsilon is exact (VP, closed form, posterior-weighted over the
modes); the one-step generator and the fake score are small MLPs built on top of the teacher, the way SIM initialises
both networks from PixArt:
    generator   x0 = (x_in - sigma_{t*} eps_G(x_in)) / alpha_{t*},  x_in = sigma_{t*} z,
                eps_G = eps_teacher(., t*) + MLP(.)  with the MLP's last layer zeroed (so G starts as the teacher's
                one-step denoiser, a blurred average of the modes)
    fake score  eps_fake(x_t, t) = eps_teacher(x_t, t) + MLP(x_t, t)  (starts equal to the teacher)
Training alternates fake-score steps (denoising score matching on detached generator samples) and generator steps
(the chosen divergence), with t ~ U{t_min..t_max}, PixArt's linear-beta schedule, Adam with SiD's betas (0, 0.999)
and an EMA of the generator (what is evaluated). `generator_init="random"` drops the teacher term from eps_G.

Run `python -m research.toy2d` (from the repository root) for a side-by-side table of the divergences (energy
distance to the mixture, its noise floor, mode weights and their total variation to the true weights). Only torch
is imported.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from sim_diffusers.generator import eps_to_x0
from sim_diffusers.losses import (
    DEFAULT_T_MAX,
    DEFAULT_T_MIN,
    DIVERGENCES,
    fake_score_loss,
    get_divergence,
    loss_weight,
    sample_timesteps,
    step_is_finite,
)
from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alpha_sigma, diffuse, timestep_for_ve_sigma


def pixart_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """alphabar of PixArt's schedule: linear betas from 1e-4 to 0.02 (DDPMScheduler's "linear")."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


# ---------------------------------------------------------------------------------------------------------------------
# The teacher: a 2-D Gaussian mixture with isotropic components.


class GaussianMixture2D:
    """Mixture sum_k w_k N(mean_k, std_k^2 I) in 2-D, with its exact VP-diffused epsilon."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        self.means = means.float()  # (K, 2)
        self.stds = stds.float()  # (K,)
        self.weights = weights.float() / weights.sum()  # (K,)

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k, None] * torch.randn(n, 2, generator=generator)

    def eps(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact eps_hat(x_t) = -sigma_t grad log p_t(x_t); x_t (B, 2), alpha and sigma (B,). Differentiable in x_t.

        Component k diffuses to N(alpha m_k, v_k I) with v_k = alpha^2 std_k^2 + sigma^2; the score is the
        posterior-weighted average of the component scores -(x_t - alpha m_k) / v_k.
        """
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]  # (B, 1, 1)
        var = alpha**2 * self.stds[None, :, None] ** 2 + sigma**2  # (B, K, 1)
        diff = x_t[:, None, :] - alpha * self.means[None]  # (B, K, 2)
        log_prob = self.weights.log() - diff.square().sum(-1) / (2 * var[..., 0]) - var[..., 0].log()  # (B, K)
        posterior = log_prob.softmax(dim=1)[..., None]  # (B, K, 1)
        score = -(posterior * diff / var).sum(dim=1)  # (B, 2)
        return -sigma[:, 0] * score

    def assign(self, x: torch.Tensor, radius: float = 3.0) -> torch.Tensor:
        """Mode index of each sample (nearest in units of each mode's std), -1 when farther than `radius` stds."""
        dist = (x[:, None, :] - self.means[None]).norm(dim=-1) / self.stds[None]  # (N, K)
        nearest = dist.min(dim=1)
        return torch.where(nearest.values <= radius, nearest.indices, torch.full_like(nearest.indices, -1))


def default_mixture() -> GaussianMixture2D:
    """Four well separated modes with unequal weights (0.4, 0.3, 0.2, 0.1) and unequal widths."""
    means = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6], [1.8, 1.6]])
    stds = torch.tensor([0.20, 0.15, 0.25, 0.15])
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    return GaussianMixture2D(means, stds, weights)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics.


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic), x (N, 2), y (M, 2)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_report(x: torch.Tensor, mixture: GaussianMixture2D) -> dict:
    """Fraction of samples per mode, off-mode fraction, total variation to the true weights, worst coverage ratio."""
    labels = mixture.assign(x)
    fractions = torch.stack([(labels == k).float().mean() for k in range(mixture.num_modes)])
    off_mode = float((labels == -1).float().mean())
    total_variation = 0.5 * float((fractions - mixture.weights).abs().sum() + off_mode)
    return {
        "fractions": [round(float(f), 3) for f in fractions],
        "off_mode": off_mode,
        "total_variation": total_variation,
        "min_coverage": float((fractions / mixture.weights).min()),  # 1 = every mode at least at its true weight
    }


def energy_noise_floor(mixture: GaussianMixture2D, n: int, repeats: int, generator: torch.Generator) -> float:
    """Mean energy distance between two independent exact sample sets of size n: what a perfect generator scores."""
    return (
        sum(energy_distance(mixture.sample(n, generator), mixture.sample(n, generator)) for _ in range(repeats))
        / repeats
    )


# ---------------------------------------------------------------------------------------------------------------------
# Networks.


def _mlp(in_features: int, hidden: int, depth: int, zero_last: bool = True) -> nn.Sequential:
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, 2)
    if zero_last:  # a residual that starts at zero: the network starts as the teacher
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


def timestep_features(t: torch.Tensor, num_train_timesteps: int, num_frequencies: int = 6) -> torch.Tensor:
    """(B,) timesteps -> (B, 2 F) sinusoidal features of t / T."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, device=t.device)
    phase = t.float()[:, None] / num_train_timesteps * freqs
    return torch.cat([phase.sin(), phase.cos()], dim=1)


class FakeScore(nn.Module):
    """eps_fake(x_t, t) = eps_teacher(x_t, t) + MLP(x_t, t)."""

    def __init__(self, mixture: GaussianMixture2D, alphas_cumprod: torch.Tensor, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.mixture, self.alphas_cumprod = mixture, alphas_cumprod
        self.residual = _mlp(2 + 12, hidden, depth)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        features = torch.cat([x_t, timestep_features(t, self.alphas_cumprod.shape[0])], dim=1)
        return self.mixture.eps(x_t, alpha, sigma) + self.residual(features)


class OneStepGenerator(nn.Module):
    """x0 = G(z): SIM's one-step map at t*, its epsilon being the teacher's plus an MLP residual."""

    def __init__(self, mixture, alphas_cumprod, t_star: int, hidden=128, depth=3, teacher_init: bool = True):
        super().__init__()
        self.mixture, self.alphas_cumprod, self.t_star = mixture, alphas_cumprod, t_star
        self.teacher_init = teacher_init  # False: eps_G is a freshly initialised MLP, no teacher term
        self.residual = _mlp(2, hidden, depth, zero_last=teacher_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = torch.full((z.shape[0],), self.t_star, dtype=torch.long)
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        x_in = sigma[:, None] * z
        eps_hat = self.residual(x_in)
        if self.teacher_init:
            eps_hat = eps_hat + self.mixture.eps(x_in, alpha, sigma)
        return eps_to_x0(x_in, eps_hat, self.alphas_cumprod, self.t_star)


# ---------------------------------------------------------------------------------------------------------------------
# Training.


@dataclass
class Toy2DConfig:
    divergence: str = "sim"
    steps: int = 2000  # generator steps
    batch_size: int = 512
    fake_steps: int = 1  # fake-score steps per generator step
    lr_generator: float = 1e-3
    lr_fake: float = 1e-3
    adam_betas: tuple[float, float] = (0.0, 0.999)  # SiD's betas; beta1 = 0 lets the fake score follow fast
    t_min: int = DEFAULT_T_MIN
    t_max: int = DEFAULT_T_MAX
    weighting: str = "sigma2"
    options: dict = field(default_factory=dict)  # passed to the divergence (huber_c, sid_alpha)
    hidden: int = 64
    ema_decay: float = 0.99  # > 0: train() returns an EMA of the generator's weights (SIM publishes an EMA copy)
    generator_init: str = "teacher"  # "teacher" (as SIM, from the teacher's one-step denoiser) or "random"
    seed: int = 0
    eval_every: int = 0  # > 0: record evaluate() every so many generator steps in the log's "history"


def train(config: Toy2DConfig, mixture: GaussianMixture2D | None = None) -> tuple[OneStepGenerator, dict]:
    """Distil `mixture` into a one-step generator with `config.divergence`. Returns the generator and a log."""
    torch.manual_seed(config.seed)
    mixture = mixture or default_mixture()
    alphas_cumprod = pixart_alphas_cumprod()
    t_star = timestep_for_ve_sigma(alphas_cumprod, DEFAULT_SIGMA_INIT)
    if config.generator_init not in ("teacher", "random"):
        raise ValueError(f"generator_init must be 'teacher' or 'random', got {config.generator_init!r}.")
    generator = OneStepGenerator(
        mixture, alphas_cumprod, t_star, hidden=config.hidden, teacher_init=config.generator_init == "teacher"
    )
    fake_score = FakeScore(mixture, alphas_cumprod, hidden=config.hidden)
    generator_ema = copy.deepcopy(generator).requires_grad_(False) if config.ema_decay > 0 else generator
    divergence = get_divergence(config.divergence)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator, betas=config.adam_betas)
    opt_f = torch.optim.Adam(fake_score.parameters(), lr=config.lr_fake, betas=config.adam_betas)
    rng = torch.Generator().manual_seed(config.seed)
    batch, skipped, history = config.batch_size, 0, []

    def noisy(x0):
        t = sample_timesteps(batch, t_min=config.t_min, t_max=config.t_max, generator=rng)
        eps = torch.randn(batch, 2, generator=rng)
        x_t, alpha, sigma = diffuse(x0, t, eps, alphas_cumprod)
        return t, alpha, sigma, eps, x_t

    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        # 1. Fake score: denoising score matching on detached generator samples.
        for _ in range(config.fake_steps):
            with torch.no_grad():
                x0 = generator(torch.randn(batch, 2, generator=rng))
            t, _, _, eps, x_t = noisy(x0)
            loss_f = fake_score_loss(fake_score(x_t, t), eps)
            opt_f.zero_grad(set_to_none=True)
            loss_f.backward()
            opt_f.step()

        # 2. Generator: fake parameters frozen, gradients through x_t wherever the divergence needs them.
        fake_score.requires_grad_(False)
        x0 = generator(torch.randn(batch, 2, generator=rng))
        t, alpha, sigma, eps, x_t = noisy(x0)
        with torch.set_grad_enabled(divergence.needs_input_grad):
            eps_teacher = mixture.eps(x_t, alpha, sigma)
            eps_fake = fake_score(x_t, t)
        weight = loss_weight(sigma, alpha, config.weighting)
        loss_g = divergence.loss(eps_teacher, eps_fake, eps, sigma, x_t=x_t, weight=weight, **config.options)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        if step_is_finite(loss_g, generator.parameters()):
            opt_g.step()
            if generator_ema is not generator:
                with torch.no_grad():
                    for p_ema, p in zip(generator_ema.parameters(), generator.parameters()):
                        p_ema.lerp_(p, 1.0 - config.ema_decay)
        else:
            skipped += 1
        fake_score.requires_grad_(True)

        if config.eval_every and step % config.eval_every == 0:
            history.append({"step": step, **evaluate(generator_ema, mixture, n=2000)})

    seconds = time.perf_counter() - start
    return generator_ema, {"seconds": seconds, "skipped_steps": skipped, "t_star": t_star, "history": history}


@torch.no_grad()
def evaluate(generator: OneStepGenerator, mixture: GaussianMixture2D, n: int = 4000, seed: int = 1234) -> dict:
    """Energy distance of n generated samples to n exact ones, the noise floor at that size, and the mode report."""
    rng = torch.Generator().manual_seed(seed)
    samples = generator(torch.randn(n, 2, generator=rng))
    result = {"energy": energy_distance(samples, mixture.sample(n, rng))}
    result["energy_floor"] = energy_noise_floor(mixture, n, repeats=4, generator=rng)
    result.update(mode_report(samples, mixture))
    return result


def run(config: Toy2DConfig, mixture: GaussianMixture2D | None = None, n_eval: int = 4000) -> dict:
    mixture = mixture or default_mixture()
    generator, log = train(config, mixture)
    return {**evaluate(generator, mixture, n_eval), **log}


def format_row(name: str, result: dict) -> str:
    fractions = " / ".join(f"{f:.2f}" for f in result["fractions"])
    return (
        f"| {name} | {result['energy']:.4f} | {result['energy'] / result['energy_floor']:.1f} | {fractions} | "
        f"{result['off_mode']:.3f} | {result['total_variation']:.3f} | {result['min_coverage']:.2f} | "
        f"{result['seconds']:.0f} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    parser.add_argument("--steps", type=int, default=Toy2DConfig.steps)
    parser.add_argument("--fake_steps", type=int, default=Toy2DConfig.fake_steps)
    parser.add_argument("--lr_generator", type=float, default=Toy2DConfig.lr_generator)
    parser.add_argument("--lr_fake", type=float, default=Toy2DConfig.lr_fake)
    parser.add_argument("--beta1", type=float, default=Toy2DConfig.adam_betas[0])
    parser.add_argument("--t_min", type=int, default=DEFAULT_T_MIN)
    parser.add_argument("--t_max", type=int, default=DEFAULT_T_MAX)
    parser.add_argument("--weighting", default=Toy2DConfig.weighting)
    parser.add_argument("--batch_size", type=int, default=Toy2DConfig.batch_size)
    parser.add_argument("--hidden", type=int, default=Toy2DConfig.hidden)
    parser.add_argument("--ema_decay", type=float, default=Toy2DConfig.ema_decay)
    parser.add_argument("--generator_init", default=Toy2DConfig.generator_init, choices=["teacher", "random"])
    parser.add_argument("--huber_c", type=float, default=None, help="sim only; default: losses.default_huber_c(2)")
    parser.add_argument("--sid_alpha", type=float, default=None, help="sid only; default: losses.DEFAULT_SID_ALPHA")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny networks: threading costs more than it gains

    mixture = default_mixture()
    base = Toy2DConfig(
        steps=args.steps,
        fake_steps=args.fake_steps,
        lr_generator=args.lr_generator,
        lr_fake=args.lr_fake,
        adam_betas=(args.beta1, 0.999),
        t_min=args.t_min,
        t_max=args.t_max,
        weighting=args.weighting,
        batch_size=args.batch_size,
        hidden=args.hidden,
        ema_decay=args.ema_decay,
        generator_init=args.generator_init,
    )
    print(f"config: {asdict(base)}")
    print(f"true weights: {' / '.join(f'{w:.2f}' for w in mixture.weights.tolist())}")
    print("| divergence | energy | energy / floor | mode fractions | off-mode | TV to weights | min coverage | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.divergences:
        options = {}
        if name == "sim" and args.huber_c is not None:
            options["huber_c"] = args.huber_c
        if name == "sid" and args.sid_alpha is not None:
            options["sid_alpha"] = args.sid_alpha
        for seed in args.seeds:
            result = run(replace(base, divergence=name, options=options, seed=seed), mixture)
            label = name if len(args.seeds) == 1 else f"{name} (seed {seed})"
            print(format_row(label, result), flush=True)


if __name__ == "__main__":
    main()
