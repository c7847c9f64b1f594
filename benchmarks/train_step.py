#!/usr/bin/env python
"""Benchmark of the trainer's SIM iteration: ms/iteration, samples/s, peak memory, a per-pass breakdown, TFLOP/s, MFU.

    python -m benchmarks.train_step --config mid --steps 5 --warmup 1 --json mid.json
    python -m benchmarks.train_step --config xl-512 --precision bf16 --batch_size 4        # on a GPU
    python -m benchmarks.train_step --config mid --ablations                               # + the variants below

What is timed is `sim_diffusers.training.iteration.SIMIteration` itself, the object the trainer calls once per step,
with the trainer's default settings (`IterationConfig()`, `OptimizerConfig()`: regression term on one sample in
four, guidance 4.5, clipping at 1, fused AdamW) plus the EMA of the README's command (`--no_ema` leaves it out). The
networks are built from a named architecture (benchmarks/configs.py) with random weights and random T5-shaped caption
embeddings (120 tokens), and placed, prepared and optimised by the package functions the trainer uses. Nothing is
downloaded. Both phases of a run are measured: "sim" (a step after the regression warm-up: divergence + regression
on the samples whose global index is a multiple of 4; with the default batch of 4, exactly one per step) and
"warmup" (a step of the regression warm-up: the regression alone, a teacher-ODE target for every sample).

Measured in rounds (each round runs every measurement once, so that load from other processes hits all alike);
medians over rounds are reported. CPU runs use one thread unless --num_threads says otherwise. Per phase:
  iteration   one call of the iteration (gradient accumulation 1, one process);
  segments    the same call with a device synchronisation at each of its hooks' marks: where the time goes inside;
  passes      each essential pass alone, synchronised: generator forward / backward, fake-score update forward /
              backward, guided teacher forward / backward to its input (both branches batched), frozen fake score
              forward / backward to its input (sim phase), the regression targets (8 guided DPM-Solver++ steps for
              the samples that get one), the two AdamW steps, the EMA update;
  overhead    iteration / sum of the passes, per round, median over rounds: what the loop adds to the unavoidable
              work (loss math, clipping, NaN checks, casts, adapter toggles, Python). Target: <= 1.15.
With --ablations, alternatives the trainer does NOT take, timed in the same rounds: the guided teacher as two
forwards (uncond, cond) instead of one batched forward; AdamW without the fused kernel; the EMA without foreach;
the NaN/Inf check over every gradient instead of reading it off the clipping norm.

Memory: on CUDA, torch.cuda.max_memory_allocated over the timed rounds. On CPU, the process's peak resident set size
(ru_maxrss) and its rise over the resident size right after the networks are built. Exact byte counts of parameters,
gradients, optimiser states and EMA come from the tensors themselves, and the bytes autograd holds at the iteration's
peak (the generator's graph plus the generator loss's, just before its backward) from saved-tensor hooks. Next to
them, the trainer's memory plan for the same configuration (sim_diffusers.training.memory) and its ratio to each
measurement ("plan" in the JSON; the GPU check tabulates them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import configs
from sim_diffusers.training.iteration import IterationConfig, IterationHooks, MicroBatch
from sim_diffusers.training.run import OptimizerConfig

PHASES = ("sim", "warmup")
EMA_DECAY = 0.999  # the trainer's --ema_decay


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--config", default="tiny", choices=configs.CONFIG_NAMES, help="Transformer architecture.")
    g.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="Samples per iteration (the trainer's default 4: one regression target per SIM step).",
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: Accelerate's bf16 mixed precision with a bf16 teacher, fp32 trainable weights (as the "
        "trainer's --mixed_precision bf16).",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Checkpoint generator, teacher and fake score (as the trainer).",
    )
    g.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="Attention kernel.")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the transformers (Module.compile, after prepare)."
    )
    g.add_argument(
        "--lora_rank", type=int, default=0, help="0: full-copy fake score; >0: LoRA fake score of this rank."
    )
    g.add_argument("--divergence", default=IterationConfig.divergence, help="sim, sim_l2, sid or dmd.")
    g.add_argument("--no_ema", action="store_true", help="Leave out the generator EMA.")
    g.add_argument(
        "--num_generator_steps",
        type=int,
        default=1,
        help="K of a K-step generator (the trainer's default timesteps); its samples train calls 1..K in turn "
        "(backward simulation).",
    )
    g = parser.add_argument_group("measurement")
    g.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="Which phases to time.")
    g.add_argument("--steps", type=int, default=5, help="Timed rounds.")
    g.add_argument("--warmup", type=int, default=1, help="Untimed rounds first (compilation, allocator, caches).")
    g.add_argument("--ablations", action="store_true", help="Also time the variants listed in the docstring.")
    g.add_argument(
        "--iteration_only",
        action="store_true",
        help="Time only the full iterations (no segments, no isolated passes): for memory and A/B runs.",
    )
    g.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    g.add_argument(
        "--num_threads", type=int, default=None, help="torch CPU threads (default on CPU: 1, see docs/performance.md)."
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", default=None, metavar="OUT", help="Write all results to this JSON file.")
    return parser.parse_args(input_args)


# ---------------------------------------------------------------------------------------------------------------------
# Set-up, with the package functions the trainer sets up with


@dataclass
class Setup:
    args: argparse.Namespace
    accelerator: object
    device: torch.device
    weight_dtype: torch.dtype
    iteration: object  # SIMIteration
    models: object  # TrainingModels
    batch: MicroBatch  # the one micro-batch every timed call uses (its positions are set per step)
    ode_scheduler: object
    extras: dict = field(default_factory=dict)

    @property
    def networks(self):
        return self.models.networks

    def step_of(self, phase: str, round_index: int) -> int:
        """A step of `phase`: the warm-up's steps come first, then SIM's."""
        warmup_steps = self.iteration.config.regression_warmup_steps
        return round_index % max(warmup_steps, 1) if phase == "warmup" else warmup_steps + round_index

    def batch_at(self, step: int) -> MicroBatch:
        """The benchmark's micro-batch as sample positions step*B .. step*B+B-1 of a one-process run: which samples
        get a regression target depends on them, exactly as in the trainer."""
        b = self.args.batch_size
        return MicroBatch(self.batch.conditioning, self.batch.randomness, range(step * b, step * b + b))


def build(
    args,
    teacher_pipe=None,
    iteration_config: IterationConfig | None = None,
    optimizer_config: OptimizerConfig | None = None,
    batch: MicroBatch | None = None,
) -> Setup:
    """Networks, optimisers and the iteration, as the trainer builds them.

    teacher_pipe: a loaded PixArtAlphaPipeline whose transformer and scheduler to use instead of a random
    architecture (tests compare the benchmark's iteration with the trainer's on the tiny fixture this way); batch:
    the micro-batch to time instead of a random one.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.training_utils import EMAModel

    from sim_diffusers.generator import default_generator_timesteps, micro_conditions
    from sim_diffusers.losses import DEFAULT_T_MAX, DEFAULT_T_MIN
    from sim_diffusers.sampling import ode_scheduler
    from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, timestep_for_ve_sigma
    from sim_diffusers.training.captions import SampleRandomness
    from sim_diffusers.training.iteration import SIMIteration, TrainingModels
    from sim_diffusers.training.models import ScoreNetworks, cast_trainable_to_fp32, place_networks
    from sim_diffusers.training.run import build_optimisation
    from sim_diffusers.training.step import Conditioning

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.precision == "bf16" else "no")
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    iteration_config = iteration_config or IterationConfig(divergence=args.divergence)
    optimizer_config = optimizer_config or OptimizerConfig()

    # 1. Teacher (weight dtype), generator (a copy, fp32 trainable, as SIMOneStepPipeline.from_teacher), fake score
    if teacher_pipe is None:
        teacher = configs.build_transformer(args.config, device, weight_dtype, seed=args.seed)
        # PixArt-alpha's scheduler (DPM-Solver++ on linear betas 1e-4..0.02)
        teacher_scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    else:
        teacher, teacher_scheduler = teacher_pipe.transformer.to(device, weight_dtype), teacher_pipe.scheduler
    config = dict(teacher.config)
    generator = cast_trainable_to_fp32(copy.deepcopy(teacher).requires_grad_(True)).train()
    networks = ScoreNetworks.build(teacher, args.lora_rank, seed=args.seed)
    place_networks(generator, networks, device, args.gradient_checkpointing, args.attention == "xformers")

    # 2. Schedule, t*, optimisers and schedules, prepared as in the trainer; EMA
    alphas_cumprod = alphas_cumprod_of(DDPMScheduler.from_config(teacher_scheduler.config)).to(device)
    t_star = timestep_for_ve_sigma(alphas_cumprod.cpu(), DEFAULT_SIGMA_INIT)
    generator_timesteps = default_generator_timesteps(t_star, args.num_generator_steps)
    optimisation = build_optimisation(optimizer_config, generator, networks, max_train_steps=10**6)
    generator_p, fake_p, *optimisation = accelerator.prepare(generator, networks.fake_score, *optimisation)
    opt_g, opt_f, sched_g, sched_f = optimisation
    if args.compile:
        for module in {id(m): m for m in (generator, networks.teacher, networks.fake_score)}.values():
            module.compile()
    ema = None
    if not args.no_ema:
        ema = EMAModel(
            generator.parameters(),
            decay=EMA_DECAY,
            model_cls=type(generator),
            model_config=generator.config,
            foreach=True,
        )
        ema.to(device)
    models = TrainingModels(generator_p, networks, fake_p, opt_g, sched_g, opt_f, sched_f, ema)
    scheduler = ode_scheduler(teacher_scheduler)
    iteration = SIMIteration(iteration_config, generator_timesteps, alphas_cumprod, scheduler)

    # 3. One batch: random caption embeddings (the text-embedding cache's dtype is the weight dtype) and randomness
    if batch is None:
        b = args.batch_size
        embeds, mask, neg, neg_mask = configs.random_text_conditioning(config, b, device, weight_dtype, seed=args.seed)
        resolution = config["sample_size"] * 8
        added = micro_conditions(generator, b, resolution, resolution, device, weight_dtype)
        gen = torch.Generator().manual_seed(args.seed)
        shape = (b, config["in_channels"], config["sample_size"], config["sample_size"])
        t_range = (DEFAULT_T_MIN, DEFAULT_T_MAX + 1)
        rnd = SampleRandomness(
            torch.randn(shape, generator=gen),
            torch.randint(*t_range, (b,), generator=gen),
            torch.randn(shape, generator=gen),
            torch.randint(*t_range, (b,), generator=gen),
            torch.randn(shape, generator=gen),
        )
        if args.num_generator_steps > 1:  # every call of the K trained by some sample, as on average in training
            rnd.generator_step = torch.arange(b) % args.num_generator_steps
            rnd.fresh_noise = torch.randn((b, args.num_generator_steps - 1, *shape[1:]), generator=gen)
        rnd = rnd.to(device)
        batch = MicroBatch(Conditioning(embeds, mask, neg, neg_mask, added), rnd, range(b))
    return Setup(args, accelerator, device, weight_dtype, iteration, models, batch, scheduler)


def run_iteration(s: Setup, step: int, hooks=None):
    """One call of the trainer's iteration at `step` (the result of the call)."""
    s.iteration.hooks = hooks or IterationHooks()
    try:
        return s.iteration(step, s.models, [s.batch_at(step)], s.accelerator)
    finally:
        s.iteration.hooks = IterationHooks()


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Named durations (seconds) of synchronised regions, collected over rounds."""

    def __init__(self, device):
        self.device = device
        self.samples: dict[str, list[float]] = {}
        self._last = None

    def start(self):
        _sync(self.device)
        self._last = time.perf_counter()

    def mark(self, name):
        _sync(self.device)
        now = time.perf_counter()
        self.samples.setdefault(name, []).append(now - self._last)
        self._last = now

    def medians(self, prefix: str = "") -> dict[str, float]:
        return {k[len(prefix) :]: statistics.median(v) for k, v in self.samples.items() if k.startswith(prefix)}


class _Segments(IterationHooks):
    """The iteration's marks as synchronised clock marks."""

    def __init__(self, clock: Clock, prefix: str):
        self.clock, self.prefix = clock, prefix

    def mark(self, name: str) -> None:
        self.clock.mark(self.prefix + name)


def _time(clock: Clock, name: str, fn):
    clock.start()
    result = fn()
    clock.mark(name)
    return result


def _isolated_passes(s: Setup, clock: Clock, phase: str, step: int, ablations: bool):
    """Each essential pass of one iteration of `phase` alone (module docstring), timed into `clock` as
    "<phase>/pass/<name>"."""
    from sim_diffusers.training.step import teacher_ode_targets

    def mark(name):
        clock.mark(f"{phase}/pass/{name}")

    net, models, batch = s.networks, s.models, s.batch_at(step)
    cond, rnd, config = batch.conditioning, batch.randomness, s.iteration.config
    acc = s.accelerator
    x_in = torch.randn_like(rnd.noise)
    with acc.autocast():
        # Generator forward with graph, backward from a random cotangent, then its AdamW step and the EMA.
        clock.start()
        x0 = s.iteration.generate(models.generator, batch, with_graph=True)
        mark("generator_forward")
        x0.backward(torch.randn_like(x0))
        mark("generator_backward")
        models.generator_optimizer.step()
        mark("generator_optimizer_step")
        models.generator_optimizer.zero_grad(set_to_none=True)
        if models.ema is not None:
            clock.start()
            models.ema.step(models.generator.parameters())
            mark("ema")

        # Fake-score update: forward on a detached x_t, backward into its trainable weights, AdamW step.
        clock.start()
        eps = net.fake_eps(x_in, rnd.fake_timesteps, cond.cond, cond.added_cond_kwargs, module=models.fake_score)
        mark("fake_score_update_forward")
        eps.backward(torch.randn_like(eps))
        mark("fake_score_update_backward")
        models.fake_score_optimizer.step()
        mark("fake_score_optimizer_step")
        models.fake_score_optimizer.zero_grad(set_to_none=True)

        # Regression targets of the samples the iteration selects at this step (no backward).
        every = 1 if s.iteration.warming_up(step) else config.regression_every
        index = torch.tensor(
            [i for i, p in enumerate(batch.positions) if p % every == 0], dtype=torch.long, device=s.device
        )
        if config.regression_loss_weight > 0 and len(index):
            clock.start()
            teacher_ode_targets(
                net,
                s.ode_scheduler,
                rnd.noise[index],
                cond.select(index),
                config.guidance_scale,
                config.regression_num_inference_steps,
            )
            mark("regression_targets")
        if phase == "warmup":
            return

        # Generator loss: guided teacher and frozen fake score, each backpropagated to its input x_t only (dmd: both
        # run under no_grad, as generator_update_loss runs them, and have no backward).
        g = config.guidance_scale
        if not s.iteration.divergence.needs_input_grad:
            with net.fake_score_frozen(), torch.no_grad():
                clock.start()
                net.teacher_eps(x_in, rnd.generator_timesteps, cond.cond, cond.uncond, g, cond.added_cond_kwargs)
                mark("teacher_forward")
                net.fake_eps(x_in, rnd.generator_timesteps, cond.cond, cond.added_cond_kwargs)
                mark("fake_score_forward")
            return
        with net.fake_score_frozen():
            x_t = x_in.clone().requires_grad_(True)
            clock.start()
            eps = net.teacher_eps(x_t, rnd.generator_timesteps, cond.cond, cond.uncond, g, cond.added_cond_kwargs)
            mark("teacher_forward")
            eps.backward(torch.randn_like(eps))
            mark("teacher_backward")
            x_t = x_in.clone().requires_grad_(True)
            clock.start()
            eps = net.fake_eps(x_t, rnd.generator_timesteps, cond.cond, cond.added_cond_kwargs)
            mark("fake_score_forward")
            eps.backward(torch.randn_like(eps))
            mark("fake_score_backward")
            if ablations:
                x_t = x_in.clone().requires_grad_(True)
                clock.start()
                eps = _teacher_eps_two_forwards(s, x_t, batch)
                clock.mark("ablation/teacher_two_forwards_forward")
                eps.backward(torch.randn_like(eps))
                clock.mark("ablation/teacher_two_forwards_backward")


def _teacher_eps_two_forwards(s: Setup, x_t, batch: MicroBatch):
    """The guided teacher epsilon as two forwards (uncond, cond) instead of guided_eps's one batched forward."""
    from sim_diffusers.generator import predict_eps

    net, cond, rnd = s.networks, batch.conditioning, batch.randomness
    dtype = net.teacher.dtype
    g = s.iteration.config.guidance_scale
    with net.teacher_mode():
        args = (x_t.to(dtype), rnd.generator_timesteps)
        eps_u = predict_eps(
            net.teacher,
            *args,
            cond.negative_prompt_embeds.to(dtype),
            cond.negative_prompt_attention_mask,
            cond.added_cond_kwargs,
        )
        eps_c = predict_eps(
            net.teacher, *args, cond.prompt_embeds.to(dtype), cond.prompt_attention_mask, cond.added_cond_kwargs
        )
    return eps_u + g * (eps_c - eps_u)


def _ablation_variants(s: Setup) -> dict:
    """Benchmark-only copies of the alternatives the trainer does not take: AdamW without the fused kernel, the EMA
    without foreach, with the same hyper-parameters."""
    from diffusers.training_utils import EMAModel

    d = OptimizerConfig()
    params = [p for p in s.models.generator.parameters() if p.requires_grad]
    return {
        "adam_unfused": torch.optim.AdamW(
            params,
            lr=d.learning_rate,
            betas=(d.adam_beta1, d.adam_beta2),
            weight_decay=d.adam_weight_decay,
            eps=d.adam_epsilon,
        ),
        "ema_no_foreach": EMAModel(s.models.generator.parameters(), decay=EMA_DECAY, foreach=False),
    }


def _time_ablations(s: Setup, clock: Clock, step: int):
    from sim_diffusers.losses import is_finite

    with s.accelerator.autocast():
        x0 = s.iteration.generate(s.models.generator, s.batch_at(step), with_graph=True)
        x0.backward(torch.randn_like(x0))  # gradients for the optimiser and the checks (not timed)
    params = s.models.generator_parameters
    _time(clock, "ablation/generator_adamw_unfused", s.extras["adam_unfused"].step)
    _time(clock, "ablation/nonfinite_check_over_every_gradient", lambda: is_finite(*[p.grad for p in params]))
    s.extras["adam_unfused"].zero_grad(set_to_none=True)
    _time(clock, "ablation/ema_no_foreach", lambda: s.extras["ema_no_foreach"].step(s.models.generator.parameters()))


def run_rounds(
    s: Setup, rounds: int, phases, ablations: bool, iteration_only: bool = False, first_round: int = 0
) -> Clock:
    clock = Clock(s.device)
    for r in range(first_round, first_round + rounds):
        for phase in phases:
            step = s.step_of(phase, r)
            _time(clock, f"{phase}/iteration", lambda: run_iteration(s, step))
            if iteration_only:
                continue
            clock.start()
            run_iteration(s, step, _Segments(clock, f"{phase}/segment/"))
            _isolated_passes(s, clock, phase, step, ablations and phase == "sim")
        if ablations:
            _time_ablations(s, clock, s.step_of("sim", r))
    return clock


ESSENTIAL_PASSES = {
    "sim": (
        "generator_forward",
        "generator_backward",
        "fake_score_update_forward",
        "fake_score_update_backward",
        "teacher_forward",
        "teacher_backward",
        "fake_score_forward",
        "fake_score_backward",
        "regression_targets",
        "fake_score_optimizer_step",
        "generator_optimizer_step",
        "ema",
    ),
    "warmup": (
        "generator_forward",
        "generator_backward",
        "fake_score_update_forward",
        "fake_score_update_backward",
        "regression_targets",
        "fake_score_optimizer_step",
        "generator_optimizer_step",
        "ema",
    ),
}


def per_round_overhead(clock: Clock, phase: str) -> float:
    """Median over rounds of iteration / sum of that round's passes (same load); nan without passes."""
    iterations = clock.samples.get(f"{phase}/iteration", [])
    passes = [
        clock.samples[f"{phase}/pass/{k}"] for k in ESSENTIAL_PASSES[phase] if f"{phase}/pass/{k}" in clock.samples
    ]
    if not passes or any(len(p) != len(iterations) for p in passes):
        return float("nan")
    return statistics.median(it / sum(p[i] for p in passes) for i, it in enumerate(iterations))


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def saved_activation_bytes(s: Setup) -> int:
    """Bytes of the tensors autograd holds at the sim iteration's peak: the generator's graph plus the generator
    loss's (teacher and F backpropagated to x_t, the regression term), just before its backward. Counted exactly
    through saved-tensor hooks, each storage once, parameters excluded (autocast's low-precision weight copies are
    counted: they are held too). Under activation checkpointing only block inputs are kept, and those are counted."""
    models, iteration = s.models, s.iteration
    params = {
        p.untyped_storage().data_ptr()
        for m in (models.generator, s.networks.teacher, s.networks.fake_score)
        for p in m.parameters()
    }
    held: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = max(held.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    step = s.step_of("sim", 0)
    batch = s.batch_at(step)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), s.accelerator.autocast():
        x0 = iteration.generate(models.generator, batch, with_graph=True)
        loss, _ = iteration.generator_loss(step, models, batch, x0, warming_up=False)
    del x0, loss
    return sum(held.values())


def static_memory(s: Setup) -> dict:
    """Bytes of parameters, gradients (as held at the peak: one per trainable parameter), optimiser states, EMA."""

    def state_bytes(opt):
        opt = getattr(opt, "optimizer", opt)  # AcceleratedOptimizer wraps the torch one
        return configs.tensor_bytes(
            t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0
        )

    models = s.models
    gen, teacher = models.generator, s.networks.teacher
    out = {
        "generator_parameters": configs.tensor_bytes(gen.parameters()),
        "generator_gradients": configs.tensor_bytes(p for p in gen.parameters() if p.requires_grad),
        "generator_optimizer_states": state_bytes(models.generator_optimizer),
        "ema": configs.tensor_bytes(models.ema.shadow_params) if models.ema is not None else 0,
        "fake_score_trainable_parameters": configs.tensor_bytes(models.fake_score_parameters),
        "fake_score_gradients": configs.tensor_bytes(models.fake_score_parameters),
        "fake_score_optimizer_states": state_bytes(models.fake_score_optimizer),
        "teacher_parameters": configs.tensor_bytes(p for p in teacher.parameters() if not p.requires_grad),
    }
    if s.networks.lora:
        out["fake_score_trainable_parameters_note"] = "LoRA adapters inside the teacher module"
    out["total"] = sum(v for v in out.values() if isinstance(v, int))
    return out


def memory_plan_of(s: Setup):
    """The trainer's memory plan (sim_diffusers.training.memory) for this benchmark's configuration: one process,
    no T5 or VAE in memory, the networks and settings built here."""
    from sim_diffusers.training.memory import Architecture, RunSpec, memory_plan

    args, config = s.args, s.iteration.config
    spec = RunSpec(
        architecture=Architecture.from_config(dict(s.networks.teacher.config)),
        batch_size=args.batch_size,
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        gradient_checkpointing=args.gradient_checkpointing,
        fake_score_lora_rank=args.lora_rank,
        text_tokens=configs.TEXT_TOKENS,
        use_ema=not args.no_ema,
        guidance_scale=config.guidance_scale,
        divergence_needs_input_grad=s.iteration.divergence.needs_input_grad,
        regression_every=config.regression_every if config.regression_loss_weight > 0 else 0,
        device_type=s.device.type,
    )
    return memory_plan(spec)


def planned_static(plan) -> dict:
    """The plan's static bytes under the names `static_memory` measures them by (world size 1: nothing sharded)."""
    by_prefix = {k.split(" (")[0]: v for k, v in plan.static.items()}
    return {
        "generator_parameters": by_prefix["generator parameters"],
        "generator_gradients": plan.gradients["generator"],
        "generator_optimizer_states": by_prefix["generator optimiser states"],
        "ema": by_prefix.get("generator EMA", 0),
        "fake_score_trainable_parameters": by_prefix["fake score parameters"],
        "fake_score_gradients": plan.gradients["fake score"],
        "fake_score_optimizer_states": by_prefix["fake score optimiser states"],
        "teacher_parameters": by_prefix["teacher parameters"],
    }


def compare_with_plan(s: Setup, memory: dict) -> dict:
    """The memory plan next to what was measured: static bytes (exact counts), activations at the generator step
    (saved-tensor bytes, without the block a checkpointed backward recomputes, which no hook sees at that moment),
    and on CUDA the peak (max_memory_allocated)."""
    plan = memory_plan_of(s)
    static = planned_static(plan)
    measured_static = {k: v for k, v in memory["static_bytes"].items() if isinstance(v, int) and k != "total"}
    activations = sum(v for k, v in plan.activations.items() if k != "recomputed block")
    out = {
        "plan_peak_bytes": plan.peak,
        "plan_peak_moment": plan.peak_moment,
        "plan_moments_bytes": plan.moments,
        "plan_static_bytes": static,
        "static_ratio": sum(static.values()) / sum(measured_static.values()),
        "static_exact": static == measured_static,
        "plan_activation_bytes": activations,
        "activation_ratio": activations / memory["saved_for_backward_bytes_at_peak"],
    }
    if "peak_allocated_bytes" in memory:
        out["peak_ratio"] = plan.peak / memory["peak_allocated_bytes"]
    return out


# ---------------------------------------------------------------------------------------------------------------------


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )


def set_cpu_threads(args) -> None:
    """On CPU, one thread unless told otherwise: on a small machine shared with other jobs, two threads contending
    for two busy cores made the same pass vary up to 5x; one thread varies far less."""
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if args.num_threads or on_cpu:
        torch.set_num_threads(args.num_threads or 1)


def phase_result(s: Setup, clock: Clock, phase: str, config: dict) -> dict:
    """Timings, FLOPs and throughput of one phase."""
    args, iteration = s.args, s.iteration
    med = clock.medians(f"{phase}/")
    iteration_s = med["iteration"]
    passes = {k: med[f"pass/{k}"] for k in ESSENTIAL_PASSES[phase] if f"pass/{k}" in med}
    essential_sum = sum(passes.values()) or float("nan")
    every = 1 if phase == "warmup" else iteration.config.regression_every
    step = s.step_of(phase, 0)
    targets = sum(1 for r in range(args.steps) for p in s.batch_at(step + r).positions if p % every == 0) / max(
        args.steps, 1
    )
    if iteration.config.regression_loss_weight <= 0:
        targets = 0.0
    flops = configs.sim_iteration_flops(
        config,
        args.batch_size,
        iteration.config.guidance_scale,
        iteration.divergence.needs_input_grad,
        args.lora_rank,
        regression_samples=targets,
        regression_steps=iteration.config.regression_num_inference_steps,
        warmup=phase == "warmup",
        generator_steps=args.num_generator_steps,
    )
    tflops = flops["total"] / iteration_s / 1e12
    peak = configs.peak_bf16_tflops(device_name(s.device)) if s.device.type == "cuda" else None
    segments = {k.split("/", 1)[1]: v * 1e3 for k, v in med.items() if k.startswith("segment/")}
    return {
        "ms_per_iteration": iteration_s * 1e3,
        "samples_per_s": args.batch_size / iteration_s,
        "regression_targets_per_iteration": targets,
        "passes_ms": {k: v * 1e3 for k, v in passes.items()},
        "essential_sum_ms": essential_sum * 1e3,
        "overhead_ratio": per_round_overhead(clock, phase),
        "overhead_ratio_of_medians": iteration_s / essential_sum,
        "segments_ms": segments,
        "segments_sum_ms": sum(segments.values()),
        "flops_per_iteration": flops,
        "achieved_tflops": tflops,
        "peak_bf16_tflops": peak,
        "mfu": (tflops / peak) if peak else None,
    }


def main(args) -> dict:
    set_cpu_threads(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    s = build(args)
    build_s = time.perf_counter() - t0
    rss_after_build = _rss_bytes()
    if args.ablations:
        s.extras = _ablation_variants(s)
    config = configs.transformer_config(args.config)

    # Warm-up rounds (compilation, allocator growth), then the timed rounds.
    t0 = time.perf_counter()
    run_rounds(s, args.warmup, args.phases, args.ablations, args.iteration_only)
    warmup_s = time.perf_counter() - t0
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    rss_before = _rss_bytes()
    clock = run_rounds(s, args.steps, args.phases, args.ablations, args.iteration_only, first_round=args.warmup)

    memory = {"static_bytes": static_memory(s), "saved_for_backward_bytes_at_peak": saved_activation_bytes(s)}
    if s.device.type == "cuda":
        memory["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(s.device)
        memory["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(s.device)
        memory["method"] = "torch.cuda.max_memory_allocated over the timed rounds"
    else:
        memory["peak_rss_bytes"] = _peak_rss_bytes()
        memory["rss_after_build_bytes"] = rss_after_build
        memory["rss_before_timed_rounds_bytes"] = rss_before
        memory["method"] = (
            "CPU: ru_maxrss (process high-water mark); its rise over the RSS after building the networks "
            "estimates gradients + optimiser states + EMA + activations"
        )
    memory["plan"] = compare_with_plan(s, memory)

    teacher = s.networks.teacher
    lora_parameters = configs.count_parameters(teacher, True) if s.networks.lora else 0
    phases = {phase: phase_result(s, clock, phase, config) for phase in args.phases}
    result = {
        "args": vars(args),
        "device": device_name(s.device),
        "torch": torch.__version__,
        "config": args.config,
        "parameters_per_transformer": configs.count_parameters(teacher) - lora_parameters,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "phases": phases,
        "ablations_ms": {k.split("/", 1)[1]: v * 1e3 for k, v in clock.medians().items() if k.startswith("ablation/")},
        "all_samples_ms": {k: [x * 1e3 for x in v] for k, v in clock.samples.items()},
        "memory": memory,
    }
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def print_report(r: dict) -> None:
    a = r["args"]
    print(
        f"\n## SIM training iteration: {r['config']}, batch {a['batch_size']}, {a['precision']}, "
        f"checkpointing {'on' if a['gradient_checkpointing'] else 'off'}, fake score "
        f"{'LoRA r=' + str(a['lora_rank']) if a['lora_rank'] else 'full copy'}, divergence {a['divergence']}"
        f"{', compiled' if a['compile'] else ''}"
    )
    print(
        f"device: {r['device']}; torch {r['torch']}; "
        f"{r['parameters_per_transformer'] / 1e6:.2f} M parameters per transformer"
    )
    for phase, p in r["phases"].items():
        print(
            f"\n### phase {phase}: {p['ms_per_iteration']:.1f} ms/iteration, {p['samples_per_s']:.2f} samples/s, "
            f"{p['regression_targets_per_iteration']:g} regression targets/iteration, "
            f"{p['flops_per_iteration']['total'] / 1e12:.4g} TFLOP/iteration -> {p['achieved_tflops']:.3g} TFLOP/s"
            + (f", MFU {100 * p['mfu']:.1f}% of {p['peak_bf16_tflops']:.0f} bf16" if p["mfu"] is not None else "")
        )
        print(
            f"overhead (iteration / sum of passes, median over rounds): {p['overhead_ratio']:.3f}; ratio of medians "
            f"{p['overhead_ratio_of_medians']:.3f} ({p['ms_per_iteration']:.1f} / {p['essential_sum_ms']:.1f} ms); "
            f"in-loop segments sum {p['segments_sum_ms']:.1f} ms"
        )
        print("\n| pass (alone) | ms |\n|---|---:|")
        for k, v in p["passes_ms"].items():
            print(f"| {k} | {v:.2f} |")
        print("\n| in-loop segment | ms |\n|---|---:|")
        for k, v in p["segments_ms"].items():
            print(f"| {k} | {v:.2f} |")
    if r["ablations_ms"]:
        print("\n| ablation (not what the trainer does) | ms |\n|---|---:|")
        for k, v in r["ablations_ms"].items():
            print(f"| {k} | {v:.2f} |")
    m = r["memory"]
    if "peak_allocated_bytes" in m:
        print(
            f"\npeak CUDA memory allocated {_mib(m['peak_allocated_bytes'])} "
            f"(reserved {_mib(m['peak_reserved_bytes'])})"
        )
    else:
        print(
            f"\npeak RSS {_mib(m['peak_rss_bytes'])}; "
            f"rise over RSS after build {_mib(m['peak_rss_bytes'] - m['rss_after_build_bytes'])}"
        )
    print(f"saved for backward at the peak (activations, exact): {_mib(m['saved_for_backward_bytes_at_peak'])}")
    st = m["static_bytes"]
    print("static: " + ", ".join(f"{k} {_mib(v)}" for k, v in st.items() if isinstance(v, int)))
    plan = m["plan"]
    print(
        f"memory plan: activations {_mib(plan['plan_activation_bytes'])} (x{plan['activation_ratio']:.3f} of "
        f"measured), static x{plan['static_ratio']:.3f} ({'exact' if plan['static_exact'] else 'not exact'}), peak "
        f"{_mib(plan['plan_peak_bytes'])} at the {plan['plan_peak_moment']}"
        + (f" (x{plan['peak_ratio']:.3f} of max_memory_allocated)" if "peak_ratio" in plan else "")
    )


if __name__ == "__main__":
    main(parse_args())
