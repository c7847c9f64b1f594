"""Generator and fake-score objectives of Score Implicit Matching (SIM), in epsilon form.

Paper symbols (Luo et al., NeurIPS 2024), for a VP diffusion x_t = alpha_t x0 + sigma_t eps:
    s = -eps_hat / sigma_t                                   score of an epsilon-predictor
    y = s_fake - s_teacher = (eps_teacher - eps_fake) / sigma_t
    r = s_fake - grad log p(x_t | x0) = (eps - eps_fake) / sigma_t
    L = E[ -w(t) <d'(y), r> ]                                generator surrogate (score-gradient theorem)

Stop-gradient structure of the generator step: only the fake score's PARAMETERS are frozen. x_t carries the
generator's graph into the teacher and the fake network, so the gradient of L flows through eps_teacher and eps_fake
inside d'(y) and through eps_fake inside r. Detaching d'(y) gives a biased gradient (tests/test_losses.py shows it).
The divergences that do not need gradients through the networks' inputs (dmd) declare it, so that the trainer can
run both networks under torch.no_grad there; see `Divergence.needs_input_grad`.

docs/objective.md has the derivation. Only torch is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Timesteps of both updates (generator and fake score): t ~ U{20..979}, as in SiD; the extremes are left out because
# the scores are badly conditioned there (sigma_t -> 0 at t = 0; no signal at t = 999).
DEFAULT_T_MIN = 20
DEFAULT_T_MAX = 979

# Pseudo-Huber scale, in score units, per square root of the number of latent elements (c = 0.03 sqrt(C H W), so
# c = 3.84 for PixArt-512's 4x64x64 latents). Why this size: ||y|| = ||eps_teacher - eps_fake|| / sigma_t, so d'(y) is
# in its linear (L2-like) regime only while the per-element RMS of eps_teacher - eps_fake is below 0.03 sigma_t, and is
# a unit vector (an L1-like, per-sample normalised gradient, like SiD's and DMD's per-sample normaliser) above it.
# With t ~ U{20..979} (sigma_t from about 0.08 to 1) that switches to the linear regime only once teacher and fake
# agree to between 0.002 (low t) and 0.03 (high t) per element, i.e. close to convergence. The paper does not state
# its c; revisit this with a benchmark.
DEFAULT_HUBER_C_PER_SQRT_ELEMENT = 0.03

# Default w(t): sigma_t^2 turns score units back into epsilon units (y r sigma_t^2 = (eps_teacher - eps_fake) .
# (eps - eps_fake)), so the L2 loss is O(1) per element at every t; it is also the weight that DMD's gradient carries.
# In the 2-D harness w = 1 let the low-noise timesteps dominate and lost whole modes; see docs/objective.md.
DEFAULT_WEIGHTING = "sigma2"

# SiD's mixing weight alpha; SiD reports alpha = 1.2 for its image experiments. alpha = 1 is SIM with L2 (up to 1/2).
DEFAULT_SID_ALPHA = 1.2

DEFAULT_DISTANCE = "pseudo_huber"
DISTANCES = ("pseudo_huber", "l2")


# ---------------------------------------------------------------------------------------------------------------------
# Small per-sample helpers. All reductions are over every non-batch dimension.


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product <a, b>: (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(dim=1)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor viewed as (B, 1, 1, ...) to broadcast against `like`."""
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def _as_batch(value, batch_size: int, device, name: str) -> torch.Tensor:
    """float | (B,) | (1,) tensor -> (B,) float32 tensor."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(batch_size)
    if value.numel() != batch_size:
        raise ValueError(
            f"`{name}` must be a scalar or have one entry per sample ({batch_size}), got {value.numel()}."
        )
    return value


def _check_eps_shapes(eps_teacher: torch.Tensor, eps_fake: torch.Tensor, noise: torch.Tensor) -> None:
    if not eps_teacher.shape == eps_fake.shape == noise.shape:
        raise ValueError(
            f"eps_teacher, eps_fake and noise must have one shape, got {tuple(eps_teacher.shape)}, "
            f"{tuple(eps_fake.shape)} and {tuple(noise.shape)}."
        )
    if eps_teacher.dim() < 2:
        raise ValueError(f"expected batched tensors (B, ...), got shape {tuple(eps_teacher.shape)}.")


def default_huber_c(num_elements: int) -> float:
    """c = DEFAULT_HUBER_C_PER_SQRT_ELEMENT * sqrt(num_elements), in score units (num_elements = C * H * W)."""
    return DEFAULT_HUBER_C_PER_SQRT_ELEMENT * math.sqrt(num_elements)


# ---------------------------------------------------------------------------------------------------------------------
# Distances d and their gradients d'.


def distance_value(y: torch.Tensor, distance: str = DEFAULT_DISTANCE, huber_c=None) -> torch.Tensor:
    """d(y) per sample, (B, ...) -> (B,): pseudo-Huber sqrt(||y||^2 + c^2) - c, or L2 ||y||^2. For monitoring."""
    sq_norm = _dot(y, y)
    if distance == "l2":
        return sq_norm
    if distance == "pseudo_huber":
        c = _huber_c(huber_c, y)
        return (sq_norm + c**2).sqrt() - c
    raise ValueError(f"Unknown distance {distance!r}; valid: {', '.join(DISTANCES)}.")


def distance_grad(y: torch.Tensor, distance: str = DEFAULT_DISTANCE, huber_c=None) -> torch.Tensor:
    """d'(y), same shape as y: pseudo-Huber y / sqrt(||y||^2 + c^2) (norm per sample), or L2 2 y. Not detached."""
    if distance == "l2":
        return 2.0 * y
    if distance == "pseudo_huber":
        c = _huber_c(huber_c, y)
        return y / _per_sample((_dot(y, y) + c**2).sqrt(), y)
    raise ValueError(f"Unknown distance {distance!r}; valid: {', '.join(DISTANCES)}.")


def _huber_c(huber_c, y: torch.Tensor) -> torch.Tensor:
    """(B,) pseudo-Huber scale: the default for y's size, a float, or one value per sample (e.g. depending on t)."""
    if huber_c is None:
        huber_c = default_huber_c(y[0].numel())
    c = _as_batch(huber_c, y.shape[0], y.device, "huber_c")
    if (c <= 0).any():
        raise ValueError("huber_c must be positive.")
    return c


# ---------------------------------------------------------------------------------------------------------------------
# Timesteps and weighting w(t).


def sample_timesteps(
    batch_size: int,
    *,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(B,) int64 timesteps drawn uniformly from {t_min, ..., t_max} (both included)."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}.")
    # Draw on the generator's device (a CPU generator cannot draw on CUDA), then move.
    draw_device = generator.device if generator is not None else device
    t = torch.randint(t_min, t_max + 1, (batch_size,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


def _weight_uniform(sigma, alpha):
    return torch.ones_like(sigma)


def _weight_sigma(sigma, alpha):
    return sigma


def _weight_sigma2(sigma, alpha):
    return sigma**2


def _weight_sigma4_over_alpha2(sigma, alpha):
    if alpha is None:
        raise ValueError("weighting 'sigma4_over_alpha2' needs alpha.")
    return sigma**4 / alpha**2


# name -> w(sigma_t, alpha_t). "uniform": D in score units. "sigma2": epsilon units (default). "sigma4_over_alpha2":
# x0 units (y sigma_t^2 / alpha_t = x0_fake - x0_teacher), the form SiD writes its loss in, with its omega = 1.
# "sigma": in between.
WEIGHTINGS: dict[str, Callable] = {
    "uniform": _weight_uniform,
    "sigma": _weight_sigma,
    "sigma2": _weight_sigma2,
    "sigma4_over_alpha2": _weight_sigma4_over_alpha2,
}


def loss_weight(
    sigma: torch.Tensor, alpha: torch.Tensor | None = None, scheme: str = DEFAULT_WEIGHTING
) -> torch.Tensor:
    """w(t) per sample from sigma_t (B,) and alpha_t (B,), for a named scheme in WEIGHTINGS."""
    if scheme not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {scheme!r}; valid: {', '.join(WEIGHTINGS)}.")
    return WEIGHTINGS[scheme](sigma, alpha)


# ---------------------------------------------------------------------------------------------------------------------
# The losses. Each returns the batch mean of a per-sample loss; the math runs in float32 (bf16 networks would lose the
# small difference eps_teacher - eps_fake otherwise), and gradients flow back through the casts.


def _prepare(eps_teacher, eps_fake, noise, sigma, weight):
    _check_eps_shapes(eps_teacher, eps_fake, noise)
    batch_size, device = eps_teacher.shape[0], eps_teacher.device
    sigma = _as_batch(sigma, batch_size, device, "sigma")
    if weight is None:
        weight = loss_weight(sigma, scheme=DEFAULT_WEIGHTING)
    else:
        weight = _as_batch(weight, batch_size, device, "weight")
    return eps_teacher.float(), eps_fake.float(), noise.float(), sigma, weight


def sim_loss(
    eps_teacher: torch.Tensor,
    eps_fake: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *,
    distance: str = DEFAULT_DISTANCE,
    huber_c=None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """SIM generator surrogate: mean over the batch of -w(t) <d'(y), r>, a scalar.

    eps_teacher: (B, C, H, W) guided teacher epsilon at x_t; eps_fake: (B, C, H, W) fake-score epsilon at x_t; both
        carry the graph back to x_t (fake parameters frozen, input gradients on). noise: eps used to build x_t.
    sigma: (B,) sigma_t. weight: (B,) w(t); None = sigma_t^2 (DEFAULT_WEIGHTING).
    distance: "pseudo_huber" (default) or "l2" (d'(y) = 2y; SiD with alpha = 1, times 2).
    huber_c: pseudo-Huber scale in score units, a float or (B,); None = DEFAULT_HUBER_C_PER_SQRT_ELEMENT * sqrt(CHW).
    """
    eps_teacher, eps_fake, noise, sigma, weight = _prepare(eps_teacher, eps_fake, noise, sigma, weight)
    sigma_ = _per_sample(sigma, eps_teacher)
    y = (eps_teacher - eps_fake) / sigma_  # s_fake - s_teacher
    r = (noise - eps_fake) / sigma_  # s_fake - grad log p(x_t | x0)
    return (-weight * _dot(distance_grad(y, distance, huber_c), r)).mean()


def sid_loss(
    eps_teacher: torch.Tensor,
    eps_fake: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *,
    sid_alpha: float = DEFAULT_SID_ALPHA,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiD generator loss in score units: mean of w(t) [(1 - alpha) ||y||^2 - <y, r>].

    With alpha = 1 it is exactly half of sim_loss(..., distance="l2") at the same weight. SiD writes it with x0
    predictions f = (x_t - sigma_t eps_hat) / alpha_t, (1 - alpha) ||f_teacher - f_fake||^2 + <f_teacher - f_fake,
    f_fake - x0>, which is this with w = sigma_t^4 / alpha_t^2 (weighting "sigma4_over_alpha2") times its omega(t).
    """
    eps_teacher, eps_fake, noise, sigma, weight = _prepare(eps_teacher, eps_fake, noise, sigma, weight)
    sigma_ = _per_sample(sigma, eps_teacher)
    y = (eps_teacher - eps_fake) / sigma_
    r = (noise - eps_fake) / sigma_
    return (weight * ((1.0 - sid_alpha) * _dot(y, y) - _dot(y, r))).mean()


def dmd_loss(
    eps_teacher: torch.Tensor,
    eps_fake: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *,
    x_t: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse-KL (DMD / Diff-Instruct) surrogate: mean of 0.5 ||x_t - sg(x_t - w y)||^2.

    Its gradient is w(t) y^T dx_t/dtheta = w (s_fake - s_teacher)^T dx_t/dtheta, the gradient of
    KL(p_theta,t || q_t) when w = 1. The epsilons are used detached (they may come from torch.no_grad); only x_t
    (B, C, H, W) carries the generator's graph. The value is 0.5 w^2 ||y||^2, a size of the mismatch, not a KL.
    `noise` is unused (kept for the uniform signature).
    """
    eps_teacher, eps_fake, noise, sigma, weight = _prepare(eps_teacher, eps_fake, noise, sigma, weight)
    if x_t.shape != eps_teacher.shape:
        raise ValueError(f"x_t must have the epsilons' shape {tuple(eps_teacher.shape)}, got {tuple(x_t.shape)}.")
    x_t = x_t.float()
    y = (eps_teacher.detach() - eps_fake.detach()) / _per_sample(sigma, eps_teacher)
    target = (x_t - _per_sample(weight, y) * y).detach()
    return (0.5 * _dot(x_t - target, x_t - target)).mean()


def fake_score_loss(
    eps_fake_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Denoising score matching for the fake score, in epsilon units: mean over elements and batch of
    w ||eps_hat - eps||^2.

    eps_fake_pred: (B, C, H, W) fake epsilon at x_t built from DETACHED generator samples; noise: the eps in x_t;
    weight: optional (B,) per-sample weight (None = 1, the usual epsilon-prediction loss).
    """
    if eps_fake_pred.shape != noise.shape:
        raise ValueError(f"eps_fake_pred {tuple(eps_fake_pred.shape)} and noise {tuple(noise.shape)} differ in shape.")
    per_sample = (eps_fake_pred.float() - noise.float()).square().flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = _as_batch(weight, per_sample.shape[0], per_sample.device, "weight") * per_sample
    return per_sample.mean()


# ---------------------------------------------------------------------------------------------------------------------
# Registry of generator divergences, one uniform call for the trainer and the 2-D harness.


@dataclass(frozen=True)
class Divergence:
    """A generator objective.

    needs_input_grad: whether the generator step must backpropagate through the teacher and the fake network with
        respect to their input x_t. False means both may run under torch.no_grad (only x_t carries the graph).
    gradient_size_exponent: e such that, for the same per-element mismatch, the norm of the gradient this loss sends
        to x0 grows like D^e with the number D of latent elements (`latent_size_scale`; docs/objective.md).
    """

    name: str
    needs_input_grad: bool
    description: str
    fn: Callable[..., torch.Tensor]
    gradient_size_exponent: float

    def loss(
        self,
        eps_teacher: torch.Tensor,
        eps_fake: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        *,
        x_t: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """Scalar generator loss. x_t: (B, C, H, W) with the generator's graph, required when not needs_input_grad.

        options: huber_c (sim), sid_alpha (sid); an option the divergence does not take raises TypeError.
        """
        if not self.needs_input_grad:
            if x_t is None:
                raise ValueError(f"divergence {self.name!r} needs x_t carrying the generator's graph.")
            return self.fn(eps_teacher, eps_fake, noise, sigma, x_t=x_t, weight=weight, **options)
        return self.fn(eps_teacher, eps_fake, noise, sigma, weight=weight, **options)


def _sim_pseudo_huber(eps_teacher, eps_fake, noise, sigma, *, weight=None, huber_c=None):
    return sim_loss(eps_teacher, eps_fake, noise, sigma, distance="pseudo_huber", huber_c=huber_c, weight=weight)


def _sim_l2(eps_teacher, eps_fake, noise, sigma, *, weight=None):
    return sim_loss(eps_teacher, eps_fake, noise, sigma, distance="l2", weight=weight)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        # pseudo-Huber with c = 0.03 sqrt(D): d'(y) is a direction whose length does not grow with D
        Divergence("sim", True, "SIM with the pseudo-Huber distance (the paper's choice)", _sim_pseudo_huber, 0.0),
        # sums of D per-element terms whose gradients are O(1) each: the norm grows like sqrt(D)
        Divergence("sim_l2", True, "SIM with the L2 distance (= 2 x SiD with alpha = 1)", _sim_l2, 0.5),
        Divergence("sid", True, "Score identity Distillation with its alpha", sid_loss, 0.5),
        Divergence("dmd", False, "reverse KL, as DMD and Diff-Instruct (no input gradients)", dmd_loss, 0.5),
    )
}


# ---------------------------------------------------------------------------------------------------------------------
# How the generator's terms scale with the latent size D = C H W (docs/objective.md, "How the terms scale with the
# latent size"). For the same per-element mismatch the gradient each term sends to x0 has a norm ~ D^e: e = 0 for the
# pseudo-Huber divergence, 1/2 for the L2-like ones, -1/2 for the regression term (a mean over elements, in either
# distance). Adam undoes a common factor of all gradients, not their balance: left alone, the regression's pull
# relative to SIM's would be 8x weaker at 512 px (D = 16,384) and 16x at 1024 px than at the benchmark's D = 256.
# The rule: every term is scaled by (D / REFERENCE_NUM_ELEMENTS)^(-e), so that each term's pull on x0, and their
# balance, is at any D what it is at the latent size the defaults were chosen at (4x8x8: every factor is 1 there).
REFERENCE_NUM_ELEMENTS = 256
REGRESSION_GRADIENT_SIZE_EXPONENT = -0.5


def latent_size_scale(gradient_size_exponent: float, num_elements: int) -> float:
    """(D / REFERENCE_NUM_ELEMENTS)^(-e): the factor that makes a term whose x0-gradient norm grows like D^e pull at
    D = `num_elements` as hard as at the reference size."""
    return (num_elements / REFERENCE_NUM_ELEMENTS) ** (-gradient_size_exponent)


def get_divergence(name: str) -> Divergence:
    """The registered divergence called `name`; ValueError listing the valid names otherwise."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}.")
    return DIVERGENCES[name]


# ---------------------------------------------------------------------------------------------------------------------
# NaN / Inf guard.


def is_finite(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor (None entries ignored) holds only finite values. One device sync in all."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def step_is_finite(loss: torch.Tensor, parameters=None) -> bool:
    """Whether a step may be applied: the loss is finite and so are the .grad of `parameters` (those that have one).

    The trainer skips (and counts) a step where this is False instead of writing NaN into the weights.
    """
    grads = [p.grad for p in parameters if p.grad is not None] if parameters is not None else []
    return is_finite(loss, *grads)


# ---------------------------------------------------------------------------------------------------------------------
# Teacher-ODE regression: the anchor that keeps every mode (docs/ground_truth.md).
#
# A one-step generator trained on a score divergence alone moves whole clusters of samples when the mode weights are
# wrong (a deterministic generator cannot split a cluster by following one shared gradient), overshoots, and ends with
# one mode per caption. Regressing a few of its samples onto the teacher's own ODE solution from the same noise (DMD's
# regression term) fixes which noise goes to which mode; the teacher's ODE pushes noise forward to the teacher's
# distribution, so this term and the divergence have the same minimiser.


def regression_loss(x0: torch.Tensor, target: torch.Tensor, distance: str = "l2", huber_c=None) -> torch.Tensor:
    """Per-sample distance between generator samples and teacher-ODE targets from the same noise: (B,).

    "l2": mean squared error per element. "pseudo_huber": 2 c (sqrt(||x0 - target||^2 + c^2) - c) / numel, which
    equals the mean squared error while ||x0 - target|| << c and grows linearly beyond c; c as for `sim_loss`
    (default DEFAULT_HUBER_C_PER_SQRT_ELEMENT * sqrt(CHW)). Why it can matter: where the network cannot yet tell which
    mode a noise belongs to, the squared error is smallest for a blend of the candidate modes, while the norm is as
    small for committing to one of them.
    """
    if x0.shape != target.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and target {tuple(target.shape)} differ in shape.")
    diff = x0.float() - target.float()
    numel = diff[0].numel()
    if distance == "l2":
        return diff.square().flatten(1).mean(dim=1)
    if distance == "pseudo_huber":
        c = _huber_c(huber_c, diff)
        return 2.0 * c * distance_value(diff, "pseudo_huber", c) / numel
    raise ValueError(f"Unknown distance {distance!r}; valid: {', '.join(DISTANCES)}.")
