"""The world: captions, each owning a Gaussian mixture over PixArt latents, with its exact diffused epsilon.

Caption c (e.g. "a red circle") owns K modes; mode k of caption c is N(mu_ck, s^2 I) over a C x H x W latent (the
VAE-scaled latent space PixArt samples in), with weights w_k shared by all captions and a uniform caption prior. Each
mean is a block sign pattern: the latent is cut into b x b blocks per channel, each block is +A or -A.

Under PixArt's VP diffusion x_t = alpha_t x0 + sigma_t eps, mode k diffuses to N(alpha_t mu_k, v_t I) with
v_t = alpha_t^2 s^2 + sigma_t^2, so with responsibilities r_k(x_t) proportional to w_k N(x_t; alpha_t mu_k, v_t I)
    E[x0 | x_t] = sum_k r_k (mu_k + alpha_t s^2 / v_t (x_t - alpha_t mu_k))
    eps*(x_t)   = (x_t - alpha_t E[x0 | x_t]) / sigma_t = sigma_t / v_t (x_t - alpha_t sum_k r_k mu_k)
               = -sigma_t grad log p_t(x_t).
The conditional eps* mixes the caption's own modes; the unconditional one mixes all captions' modes with weights
w_k / num_captions, so classifier-free guidance eps_u + g (eps_c - eps_u) is exact too.

Only torch is imported here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property

import torch

CAPTION_COLORS = ("red", "blue", "green", "yellow", "purple", "white", "black", "pink", "brown", "gray")
CAPTION_SHAPES = ("circle", "square", "triangle", "stripe", "dot", "star")

# The fidelity radius (see `GaussianMixtureWorld.fidelity_radius` and `metrics`): RADIUS_MARGIN x the RADIUS_QUANTILE
# quantile of an exact sample's pattern distance to its mode.
RADIUS_QUANTILE = 0.999
RADIUS_MARGIN = 2.0

# PixArt-alpha's noise schedule: linear betas 1e-4..0.02 over 1000 steps.
PIXART_BETA_START, PIXART_BETA_END, PIXART_NUM_TRAIN_TIMESTEPS = 1e-4, 0.02, 1000


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
        reference_block_size: when set, the fidelity radius is the one a world with blocks of this side would have
            (`at_latent_side`: larger worlds keep the default world's radius, so that the same blends are off-mode
            at every size); None: this world's own block size.
    """

    seed: int = 0
    num_captions: int = 4
    modes_per_caption: int = 3
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    block_size: int = 4
    amplitude: float = 0.8
    mode_std: float = 0.15
    mode_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    reference_block_size: int | None = None

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
    def quick(cls, **overrides) -> GaussianMixtureWorld:
        """A small world (2 captions x 2 modes in a 4x4x4 latent) for tests and CI."""
        params = dict(
            num_captions=2, modes_per_caption=2, latent_shape=(4, 4, 4), block_size=2, mode_weights=(0.7, 0.3)
        )
        params.update(overrides)
        return cls(**params)

    @classmethod
    def at_latent_side(cls, side: int, **overrides) -> GaussianMixtureWorld:
        """The default world at a latent of 4 x side x side: the same captions, modes and weights, the same per-element
        amplitude and std, the same block sign patterns upsampled (blocks of side / 2, so the same 16 blocks) and the
        same fidelity radius (a blend of two modes is off-mode at the same share at every size). Only the number of
        latent elements D changes (side 8 is the default world itself)."""
        if side < 8 or side % 8:
            raise ValueError(f"the latent side must be a multiple of 8, got {side}.")
        default = cls()
        if side == default.latent_shape[1]:
            return cls(**overrides)
        params = dict(latent_shape=(4, side, side), block_size=side // 2, reference_block_size=default.block_size)
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
        block_size = self.reference_block_size or self.block_size
        return RADIUS_MARGIN * self.mode_std / block_size * chi_quantile(self.num_blocks, RADIUS_QUANTILE)

    @property
    def mmd_bandwidth(self) -> float:
        """h = s sqrt(2 D): the typical distance between two exact samples of the same mode."""
        return self.mode_std * math.sqrt(2 * self.dim)

    def to_dict(self) -> dict:
        """The parameters (fields left at None are omitted, so that worlds from before such a field keep their
        fingerprints and cached teachers)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None}

    @classmethod
    def from_dict(cls, params: Mapping) -> GaussianMixtureWorld:
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

    # -- block patterns, what the metrics compare ------------------------------------------------------------------

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
