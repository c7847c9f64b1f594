"""One SIM training iteration, the one home of the algorithm: the trainer, the step benchmark and the research
harnesses all call `SIMIteration`; nothing else writes the loop body.

One iteration at step s (Luo et al. 2024, Alg. 1, in epsilon form), over the step's micro-batches:
  1. x0 = G(z, c), the one-step generator (`sim_diffusers.generator.one_step_generate`);
  2. fake-score update: F learns the generator's distribution by epsilon MSE on x0.detach() at random t; clip, step;
  3. generator update: the SIM divergence (`sim_diffusers.losses`) on x_t = alpha_t x0 + sigma_t eps with x0's graph,
     through the guided teacher and F with F's parameters frozen, plus the teacher-ODE regression term on one sample
     in `regression_every` (by global sample index); during the first `regression_warmup_steps` the regression alone,
     on every sample, at its own learning rate, Adam beta1 and distance; clip, step;
  4. EMA of G, when kept.
x0 is computed once and shared by both updates when there is one micro-batch (G does not change in between). With
gradient accumulation, F's micro-steps run on x0 without a graph and G's recompute it (same z, same weights) with
its graph, so that only one micro-batch's graph is held at a time.

Networks, optimisers and the distributed operations are arguments (`ops`: `backward`, `no_sync`, `clip_grad_norm_`,
`autocast`; an `accelerate.Accelerator` is one, `LocalOps` is the single-process one), so this module imports no
Accelerate and distribution is invisible to it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from ..generator import backward_simulation, one_step_generate
from ..losses import (
    DEFAULT_WEIGHTING,
    REFERENCE_NUM_ELEMENTS,
    REGRESSION_GRADIENT_SIZE_EXPONENT,
    default_huber_c,
    get_divergence,
    is_finite,
    latent_size_scale,
)
from .captions import SampleRandomness
from .step import Conditioning, fake_score_update_loss, generator_update_loss, regression_term, teacher_ode_targets

# The regression warm-up's learning rate, as a multiple of the generator's (the fake score's ratio to it).
DEFAULT_WARMUP_LEARNING_RATE_FACTOR = 10.0


@dataclass(frozen=True)
class IterationConfig:
    """Everything the iteration reads, with the trainer's defaults (the script's options of the same names).

    divergence, huber_c, sid_alpha: the generator objective (`losses.DIVERGENCES`; None = that loss's default).
    guidance_scale: classifier-free guidance of the teacher inside the loss and the regression targets.
    loss_weighting: w(t) of the generator loss (`losses.WEIGHTINGS`).
    regression_loss_weight: weight of the teacher-ODE regression next to the divergence (0: no regression at all).
    regression_every: one sample in N (by global sample index) gets a regression target after the warm-up.
    regression_num_inference_steps: DPM-Solver++ steps of each target.
    regression_distance / regression_warmup_distance: `losses.regression_loss` distance after / during the warm-up.
    regression_huber_c: c of the pseudo-Huber regression distance (None: the default for the latent size).
    regression_warmup_steps: steps 0 .. N-1 train G on the regression term alone, on every sample.
    regression_warmup_learning_rate: G's learning rate then (None: 10x the generator optimiser's own).
    regression_warmup_adam_beta1: G's Adam beta1 then; the optimiser's own betas after it.
    max_grad_norm: gradient clipping of both networks (<= 0: none).
    latent_size_normalisation: scale the divergence and the regression term with the latent size D so that each
        pulls on x0, and the two balance, as they do at 4x8x8 latents (`losses.latent_size_scale`; factors 1 there).
    """

    divergence: str = "sim"
    huber_c: float | None = None
    sid_alpha: float | None = None
    guidance_scale: float = 4.5
    loss_weighting: str = DEFAULT_WEIGHTING
    regression_loss_weight: float = 1.0
    regression_every: int = 4
    regression_num_inference_steps: int = 8
    regression_distance: str = "l2"
    regression_warmup_distance: str = "pseudo_huber"
    regression_huber_c: float | None = None
    regression_warmup_steps: int = 1000
    regression_warmup_learning_rate: float | None = None
    regression_warmup_adam_beta1: float = 0.9
    max_grad_norm: float = 1.0
    latent_size_normalisation: bool = True

    @classmethod
    def from_namespace(cls, namespace) -> IterationConfig:
        """The config of an argparse namespace (or any object) holding attributes of the same names."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})

    def term_scales(self, num_elements: int) -> tuple[float, float]:
        """(divergence factor, regression factor) at D = `num_elements` latent elements."""
        if not self.latent_size_normalisation:
            return 1.0, 1.0
        divergence = get_divergence(self.divergence)
        return (
            latent_size_scale(divergence.gradient_size_exponent, num_elements),
            latent_size_scale(REGRESSION_GRADIENT_SIZE_EXPONENT, num_elements),
        )

    def at_latent_size(self, latent_shape) -> dict:
        """What the objective is at a latent shape (C, H, W): the pseudo-Huber scales, each term's factor, and the
        regression's pull relative to the divergence's against the reference size (1 when normalised)."""
        num_elements = math.prod(latent_shape)
        divergence_scale, regression_scale = self.term_scales(num_elements)
        exponents = get_divergence(self.divergence).gradient_size_exponent, REGRESSION_GRADIENT_SIZE_EXPONENT
        unnormalised = (num_elements / REFERENCE_NUM_ELEMENTS) ** (exponents[1] - exponents[0])
        return {
            "latent_elements": num_elements,
            "huber_c": self.huber_c if self.huber_c is not None else default_huber_c(num_elements),
            "regression_huber_c": (
                self.regression_huber_c if self.regression_huber_c is not None else default_huber_c(num_elements)
            ),
            "divergence_factor": divergence_scale,
            "regression_factor": regression_scale,
            # the regression : divergence pull on x0 at this size over the same ratio at 4x8x8, for the same
            # per-element mismatch: 1 is the balance the defaults were chosen with
            "regression_to_divergence_vs_reference": unnormalised * regression_scale / divergence_scale,
            "regression_to_divergence_vs_reference_unnormalised": unnormalised,
        }

    def divergence_options(self) -> dict:
        if self.divergence == "sim" and self.huber_c is not None:
            return {"huber_c": self.huber_c}
        if self.divergence == "sid" and self.sid_alpha is not None:
            return {"sid_alpha": self.sid_alpha}
        return {}


@dataclass
class MicroBatch:
    """One micro-batch of a step: its text conditioning, its randomness, and the global index of each sample (which
    decides the samples that get a regression target, whatever the split of the global batch)."""

    conditioning: Conditioning
    randomness: SampleRandomness
    positions: Sequence[int]


@dataclass
class TrainingModels:
    """The networks and optimisation state one iteration updates.

    generator / fake_score: the modules as prepared for distribution (e.g. DDP wrappers), used for G's forward and
    F's own update; `networks` holds the plain teacher and fake score the generator step calls.
    """

    generator: torch.nn.Module
    networks: object  # training.models.ScoreNetworks
    fake_score: torch.nn.Module
    generator_optimizer: torch.optim.Optimizer
    generator_scheduler: object
    fake_score_optimizer: torch.optim.Optimizer
    fake_score_scheduler: object
    ema: object | None = None  # diffusers.training_utils.EMAModel of the generator's parameters
    generator_parameters: list = field(init=False)
    fake_score_parameters: list = field(init=False)

    def __post_init__(self):
        self.generator_parameters = list(self.generator.parameters())
        self.fake_score_parameters = [p for p in self.fake_score.parameters() if p.requires_grad]


@dataclass
class IterationResult:
    """What one iteration did: detached mean losses, whether each update was applied, and what to log."""

    fake_score_loss: torch.Tensor
    generator_loss: torch.Tensor
    divergence_loss: torch.Tensor | None
    regression_loss: torch.Tensor | None
    eps_gap: torch.Tensor | None
    warming_up: bool
    generator_learning_rate: float
    fake_score_learning_rate: float
    generator_grad_norm: torch.Tensor | None
    fake_score_grad_norm: torch.Tensor | None
    generator_finite: bool
    fake_score_finite: bool

    def logs(self) -> dict[str, float]:
        logs = {"loss/generator": self.generator_loss.item(), "loss/fake_score": self.fake_score_loss.item()}
        if self.divergence_loss is not None:
            logs["loss/divergence"] = self.divergence_loss.item()
        if self.eps_gap is not None:
            logs["eps_gap_teacher_fake"] = self.eps_gap.item()
        if self.regression_loss is not None:
            logs["loss/regression"] = self.regression_loss.item()
        logs["regression_warmup"] = int(self.warming_up)
        logs["lr/generator"] = self.generator_learning_rate
        logs["lr/fake_score"] = self.fake_score_learning_rate
        for key, norm in (
            ("grad_norm/generator", self.generator_grad_norm),
            ("grad_norm/fake_score", self.fake_score_grad_norm),
        ):
            if norm is not None:
                logs[key] = float(norm)
        return logs


class IterationHooks:
    """Points where a caller may look into (or, in tests, break) an iteration; every method is a no-op here.

    mark(name): after each phase ("generator_forward", "fake_score_update_forward", ...); the step benchmark times
    the phases with it. generator_loss(step, loss) -> loss: the generator's loss before its backward.
    before_generator_update(step): after the generator's backward passes, before its optimiser step.
    """

    def mark(self, name: str) -> None:
        pass

    def generator_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def before_generator_update(self, step: int) -> None:
        pass


class LocalOps:
    """The distributed operations of one process without Accelerate: plain backward, clipping, no autocast."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, module):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def autocast(self):
        return contextlib.nullcontext()


class SIMIteration:
    """`iteration(step, models, micro_batches, ops)` runs one training iteration (module docstring) and returns an
    `IterationResult`. The phase (regression warm-up or SIM) follows from the step, so a resumed run picks it up."""

    def __init__(
        self, config: IterationConfig, generator_timesteps, alphas_cumprod: torch.Tensor, ode_scheduler, hooks=None
    ):
        """generator_timesteps: t* of the one-step generator (an int), or the K decreasing timesteps of a K-step
        generator (`sim_diffusers.generator.few_step_generate`)."""
        self.config = config
        self.generator_timesteps = (
            [int(generator_timesteps)]
            if isinstance(generator_timesteps, int)
            else [int(t) for t in generator_timesteps]
        )
        self.alphas_cumprod = alphas_cumprod
        self.ode_scheduler = ode_scheduler
        self.hooks = hooks or IterationHooks()
        self.divergence = get_divergence(config.divergence)
        self.divergence_options = config.divergence_options()

    def warming_up(self, step: int) -> bool:
        return self.config.regression_loss_weight > 0 and step < self.config.regression_warmup_steps

    def __call__(self, step: int, models: TrainingModels, micro_batches: Sequence[MicroBatch], ops) -> IterationResult:
        accumulation = len(micro_batches)
        with ops.autocast():
            f_losses, x0_shared = self._fake_score_update(models, micro_batches, ops)
            f_norm, f_ok = self._apply_update(
                ops, f_losses, models.fake_score_optimizer, models.fake_score_scheduler, models.fake_score_parameters
            )
            self.hooks.mark("fake_score_optimizer_step")
            warming_up = self.warming_up(step)
            lr_g = self._set_generator_phase(models, warming_up)
            g_losses, parts = [], {"divergence": [], "eps_gap": [], "regression": []}
            for m, batch in enumerate(micro_batches):
                with _sync_on_last(ops, models.generator, last=m == accumulation - 1):
                    x0 = (
                        x0_shared if x0_shared is not None else self.generate(models.generator, batch, with_graph=True)
                    )
                    loss_g, terms = self.generator_loss(step, models, batch, x0, warming_up)
                    loss_g = self.hooks.generator_loss(step, loss_g)
                    ops.backward(loss_g / accumulation)
                    self.hooks.mark("generator_loss_backward")
                    g_losses.append(loss_g.detach())
                    for name, value in terms.items():
                        parts[name].append(value)
            self.hooks.before_generator_update(step)
            g_norm, g_ok = self._apply_update(
                ops, g_losses, models.generator_optimizer, models.generator_scheduler, models.generator_parameters
            )
            self.hooks.mark("generator_optimizer_step")
        if models.ema is not None and g_ok:
            models.ema.step(models.generator.parameters())
            self.hooks.mark("ema")
        return IterationResult(
            fake_score_loss=torch.stack(f_losses).mean(),
            generator_loss=torch.stack(g_losses).mean(),
            divergence_loss=_mean_or_none(parts["divergence"]),
            regression_loss=_mean_or_none(parts["regression"]),
            eps_gap=_mean_or_none(parts["eps_gap"]),
            warming_up=warming_up,
            generator_learning_rate=lr_g,
            fake_score_learning_rate=models.fake_score_scheduler.get_last_lr()[0],
            generator_grad_norm=g_norm,
            fake_score_grad_norm=f_norm,
            generator_finite=g_ok,
            fake_score_finite=f_ok,
        )

    # -- the pieces, in the order they run ---------------------------------------------------------------------------

    def generate(self, generator, batch: MicroBatch, with_graph: bool) -> torch.Tensor:
        """x0 = G(z, c) of the micro-batch, with or without the generator's graph. A K-step generator trains by
        backward simulation: the output of the call the step draws (`SampleRandomness.generator_step`, the same for
        every sample and process), the calls before it run without gradients (`generator.backward_simulation`)."""
        cond, rnd = batch.conditioning, batch.randomness
        embeds, mask, added = cond.prompt_embeds, cond.prompt_attention_mask, cond.added_cond_kwargs
        with torch.set_grad_enabled(with_graph):
            if len(self.generator_timesteps) == 1:
                return one_step_generate(
                    generator, rnd.noise, self.generator_timesteps[0], self.alphas_cumprod, embeds, mask, added
                )
            return backward_simulation(
                generator,
                rnd.noise,
                self.generator_timesteps,
                self.alphas_cumprod,
                embeds,
                mask,
                added,
                rnd.fresh_noise,
                rnd.generator_step,
            )

    def _fake_score_update(self, models: TrainingModels, micro_batches, ops):
        """F's losses (backpropagated, not yet applied) and the shared x0 (None with accumulation)."""
        accumulation = len(micro_batches)
        losses, x0_shared = [], None
        for m, batch in enumerate(micro_batches):
            with _sync_on_last(ops, models.fake_score, last=m == accumulation - 1):
                # With one micro-batch, x0 keeps its graph for the generator update (module docstring).
                x0 = self.generate(models.generator, batch, with_graph=accumulation == 1)
                self.hooks.mark("generator_forward")
                rnd = batch.randomness
                loss = fake_score_update_loss(
                    models.networks,
                    models.fake_score,
                    x0,
                    rnd.fake_timesteps,
                    rnd.fake_noise,
                    batch.conditioning,
                    self.alphas_cumprod,
                )
                self.hooks.mark("fake_score_update_forward")
                ops.backward(loss / accumulation)
                self.hooks.mark("fake_score_update_backward")
                losses.append(loss.detach())
                x0_shared = x0 if accumulation == 1 else None
        return losses, x0_shared

    def _set_generator_phase(self, models: TrainingModels, warming_up: bool) -> float:
        """G's learning rate and betas for this step: the warm-up's, or the schedule's value and the optimiser's own
        betas. Set every step, so that the schedule's value (computed from the base rate, untouched by the warm-up) is
        restored even when the last warm-up update was skipped and the scheduler did not step."""
        optimizer, config = models.generator_optimizer, self.config
        beta1, beta2 = optimizer.defaults["betas"]
        warmup_lr = config.regression_warmup_learning_rate
        if warmup_lr is None:
            warmup_lr = DEFAULT_WARMUP_LEARNING_RATE_FACTOR * optimizer.defaults["lr"]
        for group, scheduled in zip(optimizer.param_groups, models.generator_scheduler.get_last_lr()):
            group["lr"] = warmup_lr if warming_up else scheduled
            group["betas"] = (config.regression_warmup_adam_beta1 if warming_up else beta1, beta2)
        return optimizer.param_groups[0]["lr"]

    def generator_loss(self, step: int, models: TrainingModels, batch: MicroBatch, x0, warming_up: bool):
        """(loss, its detached terms by name) of one micro-batch: the divergence (not during the warm-up) plus the
        weighted regression term on the samples that get a target, each scaled with the latent size
        (`IterationConfig.term_scales`; the terms are reported unscaled). Terms: "divergence", "eps_gap" (mean squared
        eps_teacher - eps_fake), "regression" (unweighted), those that were computed."""
        config, rnd, cond = self.config, batch.randomness, batch.conditioning
        divergence_scale, regression_scale = config.term_scales(x0[0].numel())
        terms = {}
        if warming_up:
            loss = x0.sum() * 0.0
        else:
            divergence, stats = generator_update_loss(
                models.networks,
                x0,
                rnd.generator_timesteps,
                rnd.generator_noise,
                cond,
                self.alphas_cumprod,
                self.divergence,
                config.guidance_scale,
                config.loss_weighting,
                self.divergence_options,
            )
            loss = divergence_scale * divergence
            terms = {"divergence": divergence.detach(), "eps_gap": stats["eps_gap"]}
        self.hooks.mark("generator_loss_forward")
        if config.regression_loss_weight <= 0:
            return loss, terms
        every = 1 if warming_up else config.regression_every
        index = torch.tensor(
            [i for i, p in enumerate(batch.positions) if p % every == 0], dtype=torch.long, device=x0.device
        )
        # A sharded teacher's forward is a collective (each block gathers its weights from every process): a process
        # whose micro-batch has no regression sample then runs the solver on its first sample, and drops the result.
        solved = index if len(index) or not models.networks.teacher_sharded else index.new_zeros(1)
        targets = None
        if len(solved):
            targets = teacher_ode_targets(
                models.networks,
                self.ode_scheduler,
                rnd.noise[solved],
                cond.select(solved),
                config.guidance_scale,
                config.regression_num_inference_steps,
            )
        self.hooks.mark("regression_targets")
        distance = config.regression_warmup_distance if warming_up else config.regression_distance
        regression = regression_term(
            x0, targets, index, len(batch.positions) / every, distance, config.regression_huber_c
        )
        loss = loss + (1.0 if warming_up else config.regression_loss_weight) * regression_scale * regression
        terms["regression"] = regression.detach()
        return loss, terms

    def _apply_update(self, ops, loss_values, optimizer, scheduler, parameters):
        """Clip, check for NaN/Inf (loss and synchronised gradients) and step; a bad update is skipped.
        Returns (gradient norm or None, whether the update was applied)."""
        if self.config.max_grad_norm > 0:
            # The total norm is non-finite iff some gradient is: one reduction serves clipping and the NaN guard.
            grad_norm = ops.clip_grad_norm_(parameters, self.config.max_grad_norm)
            finite = is_finite(torch.stack(loss_values), grad_norm)
        else:
            grad_norm = None
            finite = is_finite(torch.stack(loss_values), *[p.grad for p in parameters if p.grad is not None])
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite


def _mean_or_none(values):
    return torch.stack(values).mean() if values else None


def _sync_on_last(ops, module, last: bool):
    """Gradients are synchronised on the last micro-batch only."""
    return contextlib.nullcontext() if last else ops.no_sync(module)
