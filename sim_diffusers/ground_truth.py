"""A caption-conditioned Gaussian-mixture world in PixArt's latent space, a real tiny PixArt teacher of it, and
ground-truth metrics for any sampler of it.

World. Caption c (e.g. "a red circle") owns K modes; mode k of caption c is N(mu_ck, s^2 I) over a C x H x W latent
(the VAE-scaled latent space PixArt samples in), with weights w_k shared by all captions and a uniform caption prior.
Each mean is a block sign pattern: the latent is cut into b x b blocks per channel, each block is +A or -A.

Exact epsilon. Under PixArt's VP diffusion x_t = alpha_t x0 + sigma_t eps, mode k diffuses to N(alpha_t mu_k, v_t I)
with v_t = alpha_t^2 s^2 + sigma_t^2, so with responsibilities r_k(x_t) proportional to w_k N(x_t; alpha_t mu_k, v_t I)
    E[x0 | x_t] = sum_k r_k (mu_k + alpha_t s^2 / v_t (x_t - alpha_t mu_k))
    eps*(x_t)   = (x_t - alpha_t E[x0 | x_t]) / sigma_t = sigma_t / v_t (x_t - alpha_t sum_k r_k mu_k)
               = -sigma_t grad log p_t(x_t).
The conditional eps* mixes the caption's own modes; the unconditional one mixes all captions' modes with weights
w_k / num_captions, so classifier-free guidance eps_u + g (eps_c - eps_u) is exact too.

Metrics (per caption, then averaged; `evaluate_pipeline_latents`):
    fidelity   fraction of samples whose pattern (their P = C (H/b) (W/b) block means) lies within
               `world.fidelity_radius` of the pattern of a mode of their own caption. The radius is 2x the 99.9%
               quantile of that distance for exact samples, (s / b) chi_P; a blend of two modes with more than ~15%
               of the other (the default world) is off-mode, while within-block texture is left to the MMD. The world
               refuses parameters for which two modes' balls overlap.
    coverage   fraction of the caption's modes that received at least 10% of their expected share (w_k n) of the
               samples, and at least one.
    weight_tv  total variation between the empirical mode weights among on-mode samples and w (1 when no sample is
               on a mode).
    mmd        maximum mean discrepancy (biased V-statistic, square-rooted) to as many exact samples of the caption,
               Gaussian kernel exp(-|x - y|^2 / (2 h^2)) with h = s sqrt(2 D), the typical distance between two exact
               samples of one mode. Its noise floor is the same statistic between two exact sample sets.

The world, its exact epsilon and the metrics import only torch. The teacher builder and the samplers import diffusers
lazily. `benchmarks/ground_truth/` holds the scripts that build the teacher and print the sampler table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .sampling import dpm_solver_sample

CAPTION_COLORS = ("red", "blue", "green", "yellow", "purple", "white", "black", "pink", "brown", "gray")
CAPTION_SHAPES = ("circle", "square", "triangle", "stripe", "dot", "star")

# Metric settings (see the module docstring for why each is what it is).
RADIUS_QUANTILE = 0.999
RADIUS_MARGIN = 2.0
COVERAGE_SHARE = 0.1

# PixArt-alpha's noise schedule: linear betas 1e-4..0.02 over 1000 steps.
PIXART_BETA_START, PIXART_BETA_END, PIXART_NUM_TRAIN_TIMESTEPS = 1e-4, 0.02, 1000

WORLD_FILE = "ground_truth.json"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "ground_truth"
# Bump when the teacher training code changes in a way that changes its weights: it is part of the cache key.
TEACHER_BUILD_VERSION = 1


def pixart_alphas_cumprod() -> torch.Tensor:
    """alphabar[t], t = 0..999, computed exactly as DDPMScheduler / DPMSolverMultistepScheduler do for "linear"."""
    betas = torch.linspace(PIXART_BETA_START, PIXART_BETA_END, PIXART_NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def chi_quantile(dof: int, q: float) -> float:
    """Quantile of the chi distribution (the norm of a standard Gaussian in `dof` dimensions).

    Wilson-Hilferty cube-root approximation of the chi-square quantile; its relative error is below 1e-3 for
    dof >= 16, far below what the fidelity radius needs.
    """
    z = float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
    c = 2.0 / (9.0 * dof)
    return math.sqrt(dof * (1.0 - c + z * math.sqrt(c)) ** 3)


# ---------------------------------------------------------------------------------------------------------------------
# The world.


@dataclass(frozen=True)
class GaussianMixtureWorld:
    """Captions, each owning a Gaussian mixture over PixArt latents; exact diffused epsilon and samples.

    Args:
        seed: seed of the mode patterns.
        num_captions: number of captions ("a red circle", "a blue square", ...), at most len(CAPTION_COLORS).
        modes_per_caption: K, modes per caption.
        latent_shape: (C, H, W) of one latent, H == W (the teacher's sample_size).
        block_size: side b of the constant blocks of each mode pattern; H and W must be multiples of it.
        amplitude: A, the absolute value of every latent element of every mode mean.
        mode_std: s, the per-element standard deviation of every mode.
        mode_weights: w_k (normalised here), the same for every caption.
    """

    seed: int = 0
    num_captions: int = 4
    modes_per_caption: int = 3
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    block_size: int = 4
    amplitude: float = 0.8
    mode_std: float = 0.15
    mode_weights: tuple[float, ...] = (0.5, 0.3, 0.2)

    def __post_init__(self):
        # JSON round trips give lists: keep the dataclass hashable and its fingerprint stable.
        object.__setattr__(self, "latent_shape", tuple(int(v) for v in self.latent_shape))
        object.__setattr__(self, "mode_weights", tuple(float(v) for v in self.mode_weights))
        channels, height, width = self.latent_shape
        if not 1 <= self.num_captions <= len(CAPTION_COLORS):
            raise ValueError(f"num_captions must be in [1, {len(CAPTION_COLORS)}], got {self.num_captions}.")
        if len(self.mode_weights) != self.modes_per_caption or min(self.mode_weights) <= 0:
            raise ValueError(f"Give {self.modes_per_caption} positive mode_weights, got {self.mode_weights}.")
        if height != width or height % self.block_size or width % self.block_size:
            raise ValueError(f"latent_shape {self.latent_shape} must be square and divisible by block_size.")
        if self.mode_std <= 0 or self.amplitude <= 0:
            raise ValueError("amplitude and mode_std must be positive.")
        if self.min_mode_separation <= 2 * self.fidelity_radius:
            raise ValueError(
                f"Modes {self.min_mode_separation:.2f} apart overlap at the fidelity radius "
                f"{self.fidelity_radius:.2f}: raise amplitude, lower mode_std or use fewer modes."
            )

    @classmethod
    def quick(cls, **overrides) -> "GaussianMixtureWorld":
        """A small world (2 captions x 2 modes in a 4x4x4 latent) for tests and CI."""
        params = dict(
            num_captions=2, modes_per_caption=2, latent_shape=(4, 4, 4), block_size=2, mode_weights=(0.7, 0.3)
        )
        params.update(overrides)
        return cls(**params)

    # -- description -------------------------------------------------------------------------------------------------

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(
            f"a {CAPTION_COLORS[i]} {CAPTION_SHAPES[i % len(CAPTION_SHAPES)]}" for i in range(self.num_captions)
        )

    @property
    def dim(self) -> int:
        """D, the number of latent elements."""
        return math.prod(self.latent_shape)

    @property
    def num_modes(self) -> int:
        """All modes of all captions."""
        return self.num_captions * self.modes_per_caption

    @property
    def weights(self) -> torch.Tensor:
        """w_k, (K,), normalised."""
        weights = torch.tensor(self.mode_weights, dtype=torch.float64)
        return (weights / weights.sum()).float()

    @property
    def num_blocks(self) -> int:
        """P, the number of constant blocks of a mode pattern."""
        return self.dim // self.block_size**2

    @property
    def fidelity_radius(self) -> float:
        """RADIUS_MARGIN x the RADIUS_QUANTILE quantile of |pattern(x0) - pattern(mu_k)| for x0 of mode k.

        A block mean of an exact sample has std s / b, so that distance is (s / b) chi_P.
        """
        return RADIUS_MARGIN * self.mode_std / self.block_size * chi_quantile(self.num_blocks, RADIUS_QUANTILE)

    @property
    def mmd_bandwidth(self) -> float:
        """h = s sqrt(2 D): the typical distance between two exact samples of the same mode."""
        return self.mode_std * math.sqrt(2 * self.dim)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, params: Mapping) -> "GaussianMixtureWorld":
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    # -- the modes ---------------------------------------------------------------------------------------------------

    @cached_property
    def means(self) -> torch.Tensor:
        """mu, (num_captions, K, C, H, W): block sign patterns of amplitude A, pairwise far apart.

        Patterns are drawn greedily: a random sign vector over the blocks is kept when it differs from every kept one
        in at least a quarter of the blocks (and enough blocks for the fidelity balls to be disjoint).
        """
        channels, height, width = self.latent_shape
        grid = (channels, height // self.block_size, width // self.block_size)
        num_blocks = math.prod(grid)
        # Patterns of modes differing in h blocks are 2 A sqrt(h) apart: enough blocks to keep the balls disjoint.
        needed = math.floor((self.fidelity_radius / self.amplitude) ** 2) + 1
        if needed > num_blocks:
            raise ValueError(
                f"Modes at most {2 * self.amplitude * math.sqrt(num_blocks):.2f} apart overlap at the fidelity radius "
                f"{self.fidelity_radius:.2f}: raise amplitude or lower mode_std."
            )
        min_hamming = max(needed, num_blocks // 4)
        generator = torch.Generator().manual_seed(self.seed)
        kept: list[torch.Tensor] = []
        for _ in range(20_000):
            candidate = torch.randint(0, 2, (num_blocks,), generator=generator) * 2 - 1
            if all(int((candidate != other).sum()) >= min_hamming for other in kept):
                kept.append(candidate)
                if len(kept) == self.num_modes:
                    break
        else:
            raise ValueError(
                f"Could not draw {self.num_modes} patterns over {num_blocks} blocks differing in {min_hamming} blocks:"
                " use a smaller block_size or fewer modes."
            )
        signs = torch.stack(kept).reshape(self.num_modes, *grid).float()
        patterns = signs.repeat_interleave(self.block_size, dim=2).repeat_interleave(self.block_size, dim=3)
        return (self.amplitude * patterns).reshape(self.num_captions, self.modes_per_caption, *self.latent_shape)

    @property
    def min_mode_separation(self) -> float:
        """The smallest distance between the patterns of two modes (any captions)."""
        flat = self.patterns(self.means.reshape(self.num_modes, *self.latent_shape))
        distances = torch.cdist(flat, flat).masked_fill(torch.eye(self.num_modes, dtype=torch.bool), math.inf)
        return float(distances.min())

    def _caption_index(self, caption_idx, batch_size: int) -> torch.Tensor:
        """(B,) caption indices with -1 meaning unconditional, from None, an int or a tensor."""
        if caption_idx is None:
            return torch.full((batch_size,), -1, dtype=torch.long)
        if isinstance(caption_idx, int):
            caption_idx = torch.full((batch_size,), caption_idx, dtype=torch.long)
        caption_idx = torch.as_tensor(caption_idx, dtype=torch.long).reshape(-1).cpu()
        if caption_idx.numel() == 1:
            caption_idx = caption_idx.expand(batch_size)
        if caption_idx.shape[0] != batch_size or caption_idx.min() < -1 or caption_idx.max() >= self.num_captions:
            raise ValueError(f"caption_idx must be -1 (unconditional) or in [0, {self.num_captions}), per sample.")
        return caption_idx

    def _log_mode_weights(self, caption_idx: torch.Tensor) -> torch.Tensor:
        """log of each sample's weight on every mode of every caption, (B, num_modes); -inf off its caption."""
        log_w = self.weights.double().log()  # (K,)
        own = log_w.repeat(self.num_captions)  # (num_modes,)
        mode_caption = torch.arange(self.num_captions).repeat_interleave(self.modes_per_caption)  # (num_modes,)
        conditional = torch.where(mode_caption[None] == caption_idx[:, None], own[None], -math.inf)
        unconditional = (own - math.log(self.num_captions))[None].expand_as(conditional)
        return torch.where((caption_idx == -1)[:, None], unconditional, conditional)

    # -- sampling and densities --------------------------------------------------------------------------------------

    def sample_x0(
        self,
        caption_idx: int | torch.Tensor | None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        return_modes: bool = False,
    ):
        """x0 ~ p(x0 | c), (N, C, H, W); caption_idx None or -1 entries sample the unconditional mixture.

        With return_modes, also the (N,) index of each sample's mode among all num_modes modes.
        """
        if num_samples is None:
            if not torch.is_tensor(caption_idx):
                raise ValueError("Give num_samples, or caption_idx as a tensor with one entry per sample.")
            num_samples = caption_idx.numel()
        caption_idx = self._caption_index(caption_idx, num_samples)
        uniform_caption = torch.randint(0, self.num_captions, (num_samples,), generator=generator)
        caption_idx = torch.where(caption_idx == -1, uniform_caption, caption_idx)
        mode = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        modes = caption_idx * self.modes_per_caption + mode
        noise = torch.randn((num_samples, *self.latent_shape), generator=generator)
        x0 = self.means.reshape(self.num_modes, *self.latent_shape)[modes] + self.mode_std * noise
        return (x0, modes) if return_modes else x0

    def _diffused(self, x_t, alpha, sigma, caption_idx):
        """x (B, D), alpha, sigma, mu (M, D), v_t (B,) and log w_k N(x_t; alpha mu_k, v_t I) up to a per-sample
        constant (B, M), in float64 on x_t's device; differentiable in x_t."""
        batch_size, device = x_t.shape[0], x_t.device
        x = x_t.reshape(batch_size, -1).double()
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=device).reshape(-1).expand(batch_size)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1).expand(batch_size)
        mu = self.means.reshape(self.num_modes, -1).to(device, torch.float64)  # (M, D)
        var = alpha**2 * self.mode_std**2 + sigma**2  # v_t, (B,)
        # |x - alpha mu_k|^2 without a (B, M, D) tensor.
        sq_dist = (
            x.square().sum(1, keepdim=True) - 2 * alpha[:, None] * x @ mu.T + alpha[:, None] ** 2 * mu.square().sum(1)
        )  # (B, M)
        log_weights = self._log_mode_weights(self._caption_index(caption_idx, batch_size)).to(device)
        return x, alpha, sigma, mu, var, log_weights - sq_dist / (2 * var[:, None])

    def exact_eps_at(self, x_t: torch.Tensor, alpha, sigma, caption_idx=None) -> torch.Tensor:
        """eps*(x_t) for x_t = alpha x0 + sigma eps; alpha, sigma scalars or (B,); caption_idx as in `sample_x0`."""
        x, alpha, sigma, mu, var, log_joint = self._diffused(x_t, alpha, sigma, caption_idx)
        responsibilities = log_joint.softmax(dim=1)  # r_k, (B, M)
        eps = (sigma / var)[:, None] * (x - alpha[:, None] * responsibilities @ mu)  # (B, D)
        return eps.to(x_t.dtype).reshape(x_t.shape)

    def exact_eps(self, x_t: torch.Tensor, timesteps, caption_idx=None, alphas_cumprod=None) -> torch.Tensor:
        """eps*(x_t, t, c): x_t (B, C, H, W), timesteps int or (B,) DDPM indices, caption_idx None/int/(B,) (-1 =
        unconditional); alphas_cumprod defaults to PixArt's schedule."""
        alphabar = self._alphabar(timesteps, alphas_cumprod, x_t.shape[0])
        return self.exact_eps_at(x_t, alphabar.sqrt(), (1 - alphabar).sqrt(), caption_idx)

    def guided_exact_eps(self, x_t, timesteps, caption_idx: int, guidance_scale: float, alphas_cumprod=None):
        """Exact classifier-free guided eps_u + g (eps_c - eps_u), with the unconditional mixture as eps_u."""
        eps_cond = self.exact_eps(x_t, timesteps, caption_idx, alphas_cumprod)
        if guidance_scale == 1.0:
            return eps_cond
        eps_uncond = self.exact_eps(x_t, timesteps, None, alphas_cumprod)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def posterior_mean_x0(self, x_t, timesteps, caption_idx=None, alphas_cumprod=None) -> torch.Tensor:
        """E[x0 | x_t, c] = (x_t - sigma_t eps*) / alpha_t."""
        alphabar = self._alphabar(timesteps, alphas_cumprod, x_t.shape[0]).to(x_t.device, x_t.dtype)
        alphabar = alphabar.reshape(-1, 1, 1, 1)
        eps = self.exact_eps(x_t, timesteps, caption_idx, alphas_cumprod)
        return (x_t - (1 - alphabar).sqrt() * eps) / alphabar.sqrt()

    def log_prob(self, x: torch.Tensor, caption_idx=None, timesteps=None, alphas_cumprod=None) -> torch.Tensor:
        """log p_t(x | c), (B,), in float64; timesteps None gives the data density p_0 (alpha 1, sigma 0)."""
        if timesteps is None:
            alpha, sigma = torch.ones(()), torch.zeros(())
        else:
            alphabar = self._alphabar(timesteps, alphas_cumprod, x.shape[0])
            alpha, sigma = alphabar.sqrt(), (1 - alphabar).sqrt()
        _, _, _, _, var, log_joint = self._diffused(x, alpha, sigma, caption_idx)
        return log_joint.logsumexp(dim=1) - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def _alphabar(self, timesteps, alphas_cumprod, batch_size: int) -> torch.Tensor:
        """alphabar[t] per sample, (B,) float64 on the CPU."""
        alphas_cumprod = pixart_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.float().cpu()
        alphabar = alphas_cumprod[torch.as_tensor(timesteps).reshape(-1).long().cpu()].double()
        return alphabar.expand(batch_size) if alphabar.numel() == 1 else alphabar

    # -- metrics -----------------------------------------------------------------------------------------------------

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Block means of latents (N, C, H, W) -> (N, P)."""
        x = x.detach().float().cpu()
        return torch.nn.functional.avg_pool2d(x, self.block_size).reshape(x.shape[0], -1)

    def assign_modes(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the mode whose pattern is nearest, among all num_modes (N,), the pattern distance (N,))."""
        mode_patterns = self.patterns(self.means.reshape(self.num_modes, *self.latent_shape))
        distances = torch.cdist(self.patterns(samples), mode_patterns)
        nearest = distances.min(dim=1)
        return nearest.indices, nearest.values


# ---------------------------------------------------------------------------------------------------------------------
# Metrics.


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """sqrt of the biased (V-statistic) MMD^2 with kernel exp(-|x - y|^2 / (2 bandwidth^2)); x (N, D), y (M, D)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()

    def kernel_mean(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2)).mean()

    return float((kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)).clamp_min(0).sqrt())


def caption_metrics(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor, reference: torch.Tensor):
    """Fidelity, coverage, weight TV, off-caption fraction, mode counts and MMD of one caption's samples (N, C, H, W)
    against exact samples `reference` of the same caption."""
    if tuple(samples.shape[1:]) != world.latent_shape:
        raise ValueError(f"Samples must be (N, {', '.join(map(str, world.latent_shape))}), got {tuple(samples.shape)}")
    samples = samples.detach().float().cpu()
    num_samples = samples.shape[0]
    nearest, distance = world.assign_modes(samples)
    on_mode = distance < world.fidelity_radius
    own = nearest // world.modes_per_caption == caption_idx
    on_own = on_mode & own
    counts = torch.bincount(nearest[on_own] % world.modes_per_caption, minlength=world.modes_per_caption)
    threshold = torch.clamp(COVERAGE_SHARE * world.weights * num_samples, min=1.0)
    total = int(counts.sum())
    weight_tv = 0.5 * float((counts / total - world.weights).abs().sum()) if total else 1.0
    return {
        "caption": world.captions[caption_idx],
        "num_samples": num_samples,
        "fidelity": float(on_own.float().mean()),
        "off_caption": float((on_mode & ~own).float().mean()),
        "coverage": float((counts >= threshold).float().mean()),
        "weight_tv": weight_tv,
        "mode_counts": counts.tolist(),
        "mmd": mmd(samples, reference, world.mmd_bandwidth),
    }


METRIC_KEYS = ("fidelity", "coverage", "weight_tv", "mmd", "off_caption")


def evaluate_pipeline_latents(
    world: GaussianMixtureWorld,
    latents_by_caption: Sequence[torch.Tensor] | Mapping[str | int, torch.Tensor],
    reference_seed: int = 1234,
) -> dict:
    """All metrics of samples (x0 latents, e.g. a pipeline's output_type="latent") of every caption.

    Args:
        latents_by_caption: one (N, C, H, W) tensor per caption, in `world.captions` order, or a mapping from
            caption text or index to it.
        reference_seed: seed of the exact samples the MMD compares against (the same for every sampler evaluated).

    Returns: {"per_caption": [metrics per caption], "mean": {metric: mean over captions},
              "floor": {metric: mean over captions of the same metrics for an exact sample set}}. "floor" is what a
              perfect sampler with as many samples scores; its "mmd" is the MMD noise floor.
    """
    if isinstance(latents_by_caption, Mapping):
        by_index = {world.captions.index(k) if isinstance(k, str) else int(k): v for k, v in latents_by_caption.items()}
        latents_by_caption = [by_index[i] for i in range(world.num_captions)]
    if len(latents_by_caption) != world.num_captions:
        raise ValueError(f"Give samples for all {world.num_captions} captions, got {len(latents_by_caption)}.")
    per_caption, floor = [], []
    for caption_idx, samples in enumerate(latents_by_caption):
        generator = torch.Generator().manual_seed(reference_seed + caption_idx)
        reference = world.sample_x0(caption_idx, samples.shape[0], generator)
        exact = world.sample_x0(caption_idx, samples.shape[0], generator)
        per_caption.append(caption_metrics(world, caption_idx, samples, reference))
        floor.append(caption_metrics(world, caption_idx, exact, reference))
    return {"per_caption": per_caption, "mean": _mean_metrics(per_caption), "floor": _mean_metrics(floor)}


def off_mode_anatomy(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor) -> dict:
    """What the off-mode samples of one caption look like: global blends, or regions that follow different modes.

    For each sample farther than the fidelity radius from every mode of its caption, take its two nearest modes a
    (nearest) and b and the blocks where their signs differ (the contested blocks). A contested block's position
    u = (m - mu_b) / (mu_a - mu_b) is 1 on mode a's value and 0 on b's. A global blend has the same u in every
    contested block; a sample whose regions decided differently has some blocks near 1 and others near 0.

    Returns the off-mode fraction and, averaged over off-mode samples: the share of contested blocks committed to a
    (u > 0.75), to b (u < 0.25) or in between, and the fraction of off-mode samples whose contested blocks disagree
    (max u - min u > 0.5: "regionally inconsistent").
    """
    patterns = world.patterns(samples)
    own = world.patterns(world.means[caption_idx])  # (K, P)
    distances = torch.cdist(patterns, own)
    off = distances.min(dim=1).values >= world.fidelity_radius
    result = {"off_mode": float(off.float().mean()), "committed_nearest": 0.0, "committed_second": 0.0,
              "in_between": 0.0, "regionally_inconsistent": 0.0}
    if not off.any():
        return result
    order = distances[off].argsort(dim=1)
    a, b = own[order[:, 0]], own[order[:, 1]]
    u = (patterns[off] - b) / (a - b).masked_fill(a == b, 1.0)
    contested = a != b
    counts = contested.sum(dim=1).clamp_min(1)
    share = lambda mask: float(((mask & contested).sum(dim=1) / counts).mean())  # noqa: E731
    spread = u.masked_fill(~contested, -math.inf).amax(dim=1) - u.masked_fill(~contested, math.inf).amin(dim=1)
    result.update(
        committed_nearest=share(u > 0.75), committed_second=share(u < 0.25),
        in_between=share((u >= 0.25) & (u <= 0.75)), regionally_inconsistent=float((spread > 0.5).float().mean()),
    )
    return result


def _own_mode_labels(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor) -> torch.Tensor:
    """For samples (..., C, H, W): the index of the caption's mode each lies within the fidelity radius of, else -1;
    shape (...)."""
    flat = samples.reshape(-1, *samples.shape[-3:])
    nearest = torch.cdist(world.patterns(flat), world.patterns(world.means[caption_idx])).min(dim=1)
    return torch.where(nearest.values < world.fidelity_radius, nearest.indices, -1).reshape(samples.shape[:-3])


def band_widths(world: GaussianMixtureWorld, caption_idx: int, line_samples: torch.Tensor, offsets: torch.Tensor) -> dict:
    """How wide, in noise space, the off-mode band is that an off-mode sample's noise lies in.

    A sampler maps noise z ~ N(0, I) to latents; its off-mode samples come from the noise between the regions it sends
    to different modes. `line_samples` (M, K, C, H, W) are its outputs along M lines in noise space, each through the
    noise of an off-mode sample at `offsets` (K,), evenly spaced, increasing and containing 0 (that sample). The band
    through a line is the run of off-mode points around offset 0; its width is estimated as (points in the run) x
    spacing, unbiased when the band's edges fall anywhere between grid points.

    Returns per line (M,): "width" (nan where the run reaches an end of the line), "censored" (it does), "between_modes"
    (on-mode points of two different modes of the caption bound it) and "max_slope" (the largest latent distance
    between neighbouring points over their noise distance: a lower bound on the map's local Lipschitz constant).
    """
    num_lines, num_points = line_samples.shape[:2]
    if offsets.shape != (num_points,) or not bool((offsets.diff() > 0).all()) or not bool((offsets == 0).any()):
        raise ValueError("offsets must be K increasing values, one of them 0, K = line_samples.shape[1].")
    labels = _own_mode_labels(world, caption_idx, line_samples)
    spacing = float(offsets.diff().mean())
    center = int((offsets == 0).nonzero())
    width = torch.full((num_lines,), math.nan)
    censored = torch.zeros(num_lines, dtype=torch.bool)
    between_modes = torch.zeros(num_lines, dtype=torch.bool)
    for m, line in enumerate(labels.tolist()):
        if line[center] != -1:  # not off-mode after all: a band of width 0
            width[m] = 0.0
            continue
        lo, hi = center, center
        while lo > 0 and line[lo - 1] == -1:
            lo -= 1
        while hi < num_points - 1 and line[hi + 1] == -1:
            hi += 1
        if lo == 0 or hi == num_points - 1:
            censored[m] = True
            continue
        width[m] = (hi - lo + 1) * spacing
        between_modes[m] = line[lo - 1] != line[hi + 1]
    steps = line_samples.detach().float().cpu().flatten(2).diff(dim=1).norm(dim=2) / offsets.diff()
    return {"width": width, "censored": censored, "between_modes": between_modes, "max_slope": steps.amax(dim=1)}


def circle_crossings(world: GaussianMixtureWorld, caption_idx: int, circle_samples: torch.Tensor) -> dict:
    """Boundary crossings of a sampler's map along great circles of noise, z(theta) = cos(theta) z1 + sin(theta) z2.

    With z1, z2 independent N(0, I), every z(theta) is N(0, I) and so is its direction dz/dtheta, independently; by
    the Gaussian Crofton (Rice) formula a circle then crosses a boundary of Gaussian surface measure A on average
    2 pi sqrt(2 / pi) A = 5.01 A times. `circle_samples` (M, K, C, H, W) are the sampler's outputs at K evenly spaced
    angles of M circles. Going round a circle, the caption's mode changes at each boundary: in one step ("clean") or
    through off-mode points (a band). Off-mode runs that return to the mode they left are excursions.

    Returns totals over the circles: "circles", "points", "off_mode" points, "crossings" (changes of mode), "clean"
    crossings, "band_points" (off-mode points inside crossings) and "excursion_points"; circles with no point on a
    mode are counted in "circles_off_mode" and add no crossing.
    """
    num_circles, num_points = circle_samples.shape[:2]
    labels = _own_mode_labels(world, caption_idx, circle_samples)
    totals = dict(circles=num_circles, points=num_circles * num_points, off_mode=int((labels == -1).sum()),
                  crossings=0, clean=0, band_points=0, excursion_points=0, circles_off_mode=0)
    for circle in labels.tolist():
        on = [k for k, label in enumerate(circle) if label != -1]
        if not on:
            totals["circles_off_mode"] += 1
            continue
        for here, there in zip(on, on[1:] + [on[0] + num_points]):  # cyclic: the last on-mode point to the first
            gap = there - here - 1
            if circle[here] != circle[there % num_points]:
                totals["crossings"] += 1
                totals["clean"] += gap == 0
                totals["band_points"] += gap
            else:
                totals["excursion_points"] += gap
    return totals


def _mean_metrics(rows: Sequence[dict]) -> dict:
    return {key: sum(row[key] for row in rows) / len(rows) for key in METRIC_KEYS}


# ---------------------------------------------------------------------------------------------------------------------
# Samplers: any pipeline, the exact-epsilon oracle, and the teacher with DPM-Solver++.


def sample_pipeline_latents(
    pipe, world: GaussianMixtureWorld, num_samples: int, seed: int = 0, **call_kwargs
) -> list[torch.Tensor]:
    """`num_samples` latents per caption from a SIMOneStepPipeline or PixArtAlphaPipeline, output_type="latent".

    Caption i is sampled in one call with a CPU generator seeded `seed + i`, so every sampler starts from the same
    noise. `call_kwargs` go to the pipeline (num_inference_steps, guidance_scale, ...).
    """
    call_kwargs.setdefault("use_resolution_binning", False)  # the tiny teacher's sample_size has no PixArt bin
    pipe.set_progress_bar_config(disable=True)
    latents = []
    for caption_idx, caption in enumerate(world.captions):
        generator = torch.Generator().manual_seed(seed + caption_idx)
        out = pipe(prompt=caption, num_images_per_prompt=num_samples, generator=generator, output_type="latent",
                   **call_kwargs)
        latents.append(out.images.detach().float().cpu())
    return latents


def evaluate_pipeline(pipe, world: GaussianMixtureWorld, num_samples: int = 256, seed: int = 0, **call_kwargs) -> dict:
    """`evaluate_pipeline_latents` of `sample_pipeline_latents`: e.g. a SIMOneStepPipeline being distilled."""
    return evaluate_pipeline_latents(world, sample_pipeline_latents(pipe, world, num_samples, seed, **call_kwargs))


def initial_noise(world, num_samples, seed, caption_idx, device="cpu"):
    """The noise z ~ N(0, I) that `sample_pipeline_latents` (and so every sampler here) starts caption
    `caption_idx` from: what PixArtAlphaPipeline.prepare_latents draws from a CPU generator seeded seed + caption_idx."""
    generator = torch.Generator().manual_seed(seed + caption_idx)
    return torch.randn((num_samples, *world.latent_shape), generator=generator).to(device)


def sample_exact_latents(
    world: GaussianMixtureWorld, scheduler, num_samples: int, num_inference_steps: int, guidance_scale: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The exact-epsilon oracle: `scheduler`'s sampler (e.g. the teacher's DPM-Solver++) driven by eps*."""
    alphas_cumprod = scheduler.alphas_cumprod
    latents = []
    for caption_idx in range(world.num_captions):
        noise = initial_noise(world, num_samples, seed, caption_idx)

        def eps_fn(x_t, t, caption_idx=caption_idx):
            return world.guided_exact_eps(x_t, int(t), caption_idx, guidance_scale, alphas_cumprod)

        latents.append(dpm_solver_sample(eps_fn, scheduler, noise, num_inference_steps))
    return latents


def sample_teacher_latents(
    pipe, world: GaussianMixtureWorld, num_samples: int, num_inference_steps: int, guidance_scale: float = 1.0,
    seed: int = 0, use_pipeline: bool | None = None,
) -> list[torch.Tensor]:
    """A PixArtAlphaPipeline teacher with its own scheduler (DPM-Solver++), seeded as `sample_pipeline_latents`.

    PixArtAlphaPipeline cannot take a single DPM-Solver++ step (with num_inference_steps == 1 it reads a second
    output of `scheduler.step`, which only DDPM-like schedulers return), so by default one step runs the same loop
    here (`dpm_solver_sample` with the pipeline's prompt embeddings and `guided_eps`); more steps call the pipeline.
    """
    if use_pipeline is None:
        use_pipeline = num_inference_steps > 1
    if use_pipeline:
        return sample_pipeline_latents(
            pipe, world, num_samples, seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
    from sim_diffusers.generator import guided_eps

    device = pipe.transformer.device
    latents = []
    for caption_idx, caption in enumerate(world.captions):
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            caption, guidance_scale > 1.0, negative_prompt="", device=device, clean_caption=True,
            num_images_per_prompt=num_samples,
        )
        noise = initial_noise(world, num_samples, seed, caption_idx, device)

        @torch.no_grad()
        def eps_fn(x_t, t):
            return guided_eps(pipe.transformer, x_t, t, embeds, mask, negative_embeds, negative_mask, guidance_scale)

        latents.append(dpm_solver_sample(eps_fn, pipe.scheduler, noise, num_inference_steps).float().cpu())
    return latents


# ---------------------------------------------------------------------------------------------------------------------
# The teacher: a real tiny PixArt-alpha pipeline trained by regression on the exact epsilon.


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture and training settings of the tiny PixArt teacher (tokenizer, T5 and VAE: the tiny fixture's).

    Training: x0 ~ world, t ~ U{0..999}, x_t = alpha_t x0 + sigma_t eps, loss |eps_theta(x_t, t, c) - eps*(x_t, t, c)|^2
    (regression on the exact epsilon: no sampling noise in the target); with probability `uncond_prob` the caption is
    replaced by the empty prompt "" and the target by the unconditional eps*, so that classifier-free guidance works.
    AdamW with linear warmup and cosine decay to zero.
    """

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    train_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 6e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    uncond_prob: float = 0.1
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> "TeacherConfig":
        """A teacher of `GaussianMixtureWorld.quick()` (4 tokens) that trains in about a minute on one core."""
        params = dict(num_layers=3, train_steps=600, warmup_steps=60)
        params.update(overrides)
        return cls(**params)

    def transformer_overrides(self, world: GaussianMixtureWorld) -> dict:
        width = self.num_attention_heads * self.attention_head_dim
        channels, size, _ = world.latent_shape
        return dict(num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
                    attention_head_dim=self.attention_head_dim, cross_attention_dim=width, in_channels=channels,
                    out_channels=2 * channels, sample_size=size)


def teacher_cache_key(world: GaussianMixtureWorld, config: TeacherConfig) -> str:
    payload = {"world": world.to_dict(), "teacher": asdict(config), "version": TEACHER_BUILD_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def encode_world_captions(pipe, world: GaussianMixtureWorld):
    """T5 embeddings of every caption and of the empty negative prompt, exactly as PixArtAlphaPipeline.__call__ makes
    them (clean_caption=True, 120 tokens). Returns (embeds (n_captions, L, D), mask, empty_embeds (1, L, D), mask)."""
    device = pipe.transformer.device
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        list(world.captions), True, negative_prompt="", device=device, clean_caption=True
    )
    return embeds, mask, negative_embeds[:1], negative_mask[:1]


def teacher_eps_error(pipe, world: GaussianMixtureWorld, timesteps=(20, 50, 100, 200, 440, 600, 800, 999),
                      num_samples: int = 256, seed: int = 0) -> dict:
    """How close a teacher pipeline's epsilon is to eps*, at each of `timesteps` and over t ~ U{0..999}.

    Per row: "conditional" and "unconditional" relative errors |eps_theta - eps*|^2 / |eps*|^2 (summed over the
    samples), and "x0_rms_conditional", the RMS per latent element of the implied x0 error (sigma_t / alpha_t)
    (eps_theta - eps*), to compare with the mode std s. Full 120-token embeddings, as the pipelines run it.
    """
    from sim_diffusers.generator import predict_eps

    embeds, mask, empty_embeds, empty_mask = encode_world_captions(pipe, world)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float().cpu()
    generator = torch.Generator().manual_seed(seed)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype

    @torch.no_grad()
    def errors(t: torch.Tensor, conditional: bool) -> tuple[float, float]:
        caption = torch.randint(0, world.num_captions, (num_samples,), generator=generator)
        x0 = world.sample_x0(caption, generator=generator)
        alphabar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = alphabar.sqrt() * x0 + (1 - alphabar).sqrt() * torch.randn(x0.shape, generator=generator)
        target = world.exact_eps(x_t, t, caption if conditional else None, alphas_cumprod)
        cond_embeds = embeds[caption] if conditional else empty_embeds.expand(num_samples, -1, -1)
        cond_mask = mask[caption] if conditional else empty_mask.expand(num_samples, -1)
        eps = predict_eps(pipe.transformer, x_t.to(device, dtype), t.to(device), cond_embeds, cond_mask).float().cpu()
        relative = float((eps - target).square().sum() / target.square().sum())
        x0_rms = float((((1 - alphabar) / alphabar).sqrt() * (eps - target)).square().mean().sqrt())
        return relative, x0_rms

    def row(t: torch.Tensor) -> dict:
        (cond, x0_rms), (uncond, _) = errors(t, True), errors(t, False)
        return {"conditional": cond, "unconditional": uncond, "x0_rms_conditional": x0_rms}

    report = {"per_timestep": {int(t): row(torch.full((num_samples,), int(t))) for t in timesteps}}
    report["uniform_t"] = row(torch.randint(0, alphas_cumprod.shape[0], (num_samples,), generator=generator))
    report["num_samples"] = num_samples
    return report


def train_teacher(world: GaussianMixtureWorld, config: TeacherConfig, log_every: int = 0):
    """Build and train the tiny PixArt-alpha teacher pipeline of `world` in memory; returns (pipe, train_log)."""
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers.generator import predict_eps
    from sim_diffusers.schedule import alpha_sigma
    from sim_diffusers.testing import tiny_pixart_components

    # 1. The pipeline: the tiny fixture's tokenizer, T5, VAE and scheduler, and a transformer shaped for the world
    components = tiny_pixart_components(seed=config.seed, **config.transformer_overrides(world))
    pipe = PixArtAlphaPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float()

    # 2. Caption embeddings, encoded once. Padding tokens are masked out of cross-attention (bias -10000, exp(.) == 0
    # in float32), so cutting every embedding after the last real token changes nothing but the cost.
    with torch.no_grad():
        embeds, mask, empty_embeds, empty_mask = encode_world_captions(pipe, world)
    length = int(torch.cat([mask, empty_mask]).nonzero()[:, 1].max()) + 1
    embeds, mask = embeds[:, :length], mask[:, :length]
    empty_embeds, empty_mask = empty_embeds[:, :length], empty_mask[:, :length]

    # 3. Optimiser: AdamW, linear warmup then cosine decay to zero
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # 4. Regression on the exact epsilon
    generator = torch.Generator().manual_seed(config.seed)
    transformer.train()
    log, start = [], time.perf_counter()
    for step in range(config.train_steps):
        caption = torch.randint(0, world.num_captions, (config.batch_size,), generator=generator)
        x0 = world.sample_x0(caption, generator=generator)  # the unconditional x0 law too: the caption prior is uniform
        t = torch.randint(0, alphas_cumprod.shape[0], (config.batch_size,), generator=generator)
        alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
        x_t = alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.uncond_prob
        target = world.exact_eps(x_t, t, torch.where(drop, -1, caption), alphas_cumprod)
        cond_embeds = torch.where(drop[:, None, None], empty_embeds, embeds[caption])
        cond_mask = torch.where(drop[:, None], empty_mask, mask[caption])

        eps = predict_eps(transformer, x_t, t, cond_embeds, cond_mask)
        loss = (eps - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(log[-log_every:]) / log_every
            print(f"step {step + 1}/{config.train_steps}  loss {recent:.4f}  {time.perf_counter() - start:.0f}s",
                  flush=True)
    transformer.eval()
    return pipe, {"loss": log, "train_seconds": time.perf_counter() - start}


def load_or_build_teacher(
    world: GaussianMixtureWorld,
    config: TeacherConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    log_every: int = 0,
) -> Path:
    """The folder of the world's teacher (a complete PixArt-alpha pipeline, safetensors, plus WORLD_FILE), trained
    once and cached under `cache_dir` (default <repo>/.cache/ground_truth/) by a hash of the world and the config."""
    config = config or TeacherConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = cache_dir / f"teacher-{teacher_cache_key(world, config)}"
    if (path / WORLD_FILE).exists() and not rebuild:
        return path

    start = time.perf_counter()
    pipe, train_log = train_teacher(world, config, log_every)
    accuracy = teacher_eps_error(pipe, world)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    loss = train_log["loss"]
    record = {
        "world": world.to_dict(),
        "teacher": asdict(config),
        "version": TEACHER_BUILD_VERSION,
        "captions": list(world.captions),
        "train_seconds": round(train_log["train_seconds"], 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(loss[-50:]) / len(loss[-50:]),
        "relative_eps_error": accuracy,
    }
    (tmp / WORLD_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_world(teacher_path: str | os.PathLike) -> GaussianMixtureWorld:
    """The world a cached teacher folder was trained on."""
    return GaussianMixtureWorld.from_dict(read_teacher_record(teacher_path)["world"])


def read_teacher_record(teacher_path: str | os.PathLike) -> dict:
    """WORLD_FILE of a teacher folder: world, teacher config, build time and relative eps error."""
    return json.loads((Path(teacher_path) / WORLD_FILE).read_text())
