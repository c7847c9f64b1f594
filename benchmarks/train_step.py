#!/usr/bin/env python
"""Benchmark of SIM training iterations: ms/iteration, samples/s, peak memory, a per-pass breakdown, TFLOP/s and MFU.

    python benchmarks/train_step.py --config mid --steps 5 --warmup 1 --json mid.json
    python benchmarks/train_step.py --config xl-512 --precision bf16 --batch_size 4          # on a GPU
    python benchmarks/train_step.py --config mid --ablations                                   # + the variants below

The networks are built from a named architecture (benchmarks/configs.py) with random weights and random T5-shaped
caption embeddings (120 tokens); nothing is downloaded. They are set up as training_scripts/train_sim_pixart.py sets
them up: teacher in the weight dtype, generator and fake score with fp32 trainable weights, `Accelerator.prepare`,
`Accelerator.autocast`, AdamW with the script's defaults, gradient clipping at 1, EMA of the generator.

Measured in rounds (each round runs every measurement once, so that load from other processes hits all of them
alike); medians over rounds are reported. CPU runs use one thread unless --num_threads says otherwise.
  iteration       `trainer_iteration`: one iteration of the script's loop (gradient accumulation 1, one process),
                  written as a function that calls the same package functions in the same order. It is a copy of the
                  loop's control flow (10 lines), not of any math; keep it in step with the script.
  segments        the same function with a device synchronisation after each of its steps: where the time goes
                  inside the loop (the synchronisations make this slightly slower than `iteration`).
  passes          each essential pass alone, synchronised: generator forward / backward, fake-score update forward /
                  backward, guided teacher forward / backward to its input (both branches in one batched forward),
                  frozen fake score forward / backward to its input, the two AdamW steps, the EMA update.
  overhead        iteration / sum of the passes, per round, median over rounds: what the loop adds to the unavoidable
                  work (loss math, clipping, NaN checks, casts, adapter toggles, Python). Target: <= 1.15.
With --ablations, in the same rounds: the guided teacher as two forwards (uncond, cond) instead of one batched one;
the iteration with x0 recomputed for the generator update instead of shared (what the script does when
gradient_accumulation_steps > 1); the iteration with the NaN/Inf check read off the clipping norm; the EMA with
foreach updates; AdamW with fused=True. These variants exist only here; the script is unchanged.

Memory: on CUDA, torch.cuda.max_memory_allocated over the timed rounds. On CPU, the process's peak resident set size
(ru_maxrss, the high-water mark since start) and its rise over the resident size right after the networks are built
(an estimate of activations + gradients + optimiser states + EMA; the allocator may keep freed pages, and the
ablation variants allocate their own copies, so read memory from runs without --ablations). Exact byte counts of
parameters, gradients, optimiser states and EMA are computed from the tensors themselves on any device.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the package and `benchmarks` import from the repo
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import configs  # noqa: E402

# The training script's defaults (training_scripts/train_sim_pixart.py parse_args).
TRAINER_DEFAULTS = SimpleNamespace(
    learning_rate=5e-6, fake_score_learning_rate=5e-5, adam_beta1=0.0, adam_beta2=0.999, adam_weight_decay=0.0,
    adam_epsilon=1e-8, use_8bit_adam=False, max_grad_norm=1.0, guidance_scale=4.5, loss_weighting="sigma2",
    min_timestep=20, max_timestep=979, ema_decay=0.999,
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--config", default="tiny", choices=configs.CONFIG_NAMES, help="Transformer architecture.")
    g.add_argument("--batch_size", type=int, default=1, help="Samples per iteration.")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: Accelerate's bf16 mixed precision with a bf16 teacher, fp32 trainable weights (as the trainer's --mixed_precision bf16).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Checkpoint generator, teacher and fake score (as the trainer).")
    g.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="Attention kernel.")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformers (Module.compile, after prepare).")
    g.add_argument("--lora_rank", type=int, default=0, help="0: full-copy fake score; >0: LoRA fake score of this rank.")
    g.add_argument("--divergence", default="sim", help="sim, sim_l2, sid or dmd.")
    g.add_argument("--no_ema", action="store_true", help="Leave out the generator EMA.")
    g = parser.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=5, help="Timed rounds.")
    g.add_argument("--warmup", type=int, default=1, help="Untimed rounds first (compilation, allocator, caches).")
    g.add_argument("--ablations", action="store_true", help="Also time the variants listed in the docstring.")
    g.add_argument("--iteration_only", action="store_true", help="Time only the full iteration (no segments, no isolated passes): for memory and A/B runs.")
    g.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default on CPU: 1, see docs/performance.md).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", default=None, metavar="OUT", help="Write all results to this JSON file.")
    return parser.parse_args(input_args)


# ---------------------------------------------------------------------------------------------------------------------
# Set-up, as the training script does it


@dataclass
class Setup:
    args: argparse.Namespace
    accelerator: object
    device: torch.device
    weight_dtype: torch.dtype
    generator: torch.nn.Module  # prepared (on one process, the same module with an autocasting forward)
    networks: object  # ScoreNetworks
    fake_module: torch.nn.Module  # the prepared fake score, used for its own update
    opt_g: object
    opt_f: object
    sched_g: object
    sched_f: object
    g_params: list
    f_params: list
    ema: object | None
    cond: object  # Conditioning
    rnd: object  # SampleRandomness
    alphas_cumprod: torch.Tensor
    t_star: int
    divergence: object
    extras: dict = field(default_factory=dict)


def build(args) -> Setup:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sim_diffusers.generator import micro_conditions
    from sim_diffusers.losses import get_divergence
    from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, timestep_for_ve_sigma
    from sim_diffusers.training.captions import SampleRandomness
    from sim_diffusers.training.models import ScoreNetworks, cast_trainable_to_fp32
    from sim_diffusers.training.run import build_optimizer
    from sim_diffusers.training.step import Conditioning

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.precision == "bf16" else "no")
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = configs.transformer_config(args.config)

    # 1. Teacher (weight dtype), generator (a copy, fp32 trainable, as SIMOneStepPipeline.from_teacher), fake score
    teacher = configs.build_transformer(args.config, device, weight_dtype, seed=args.seed)
    generator = cast_trainable_to_fp32(copy.deepcopy(teacher).requires_grad_(True)).train()
    networks = ScoreNetworks.build(teacher, args.lora_rank)
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        networks.enable_gradient_checkpointing()  # recomputes teacher/F blocks under their forward-time state
    unique = list({id(m): m for m in (generator, networks.teacher, networks.fake_score)}.values())
    if args.attention == "xformers":
        for module in unique:
            module.enable_xformers_memory_efficient_attention()  # raises a clear error if xformers is missing

    # 2. Schedule, t*, optimisers and schedules, prepared as in the script
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    alphas_cumprod = alphas_cumprod_of(scheduler).to(device)
    t_star = timestep_for_ve_sigma(alphas_cumprod.cpu(), DEFAULT_SIGMA_INIT)
    opt_g = build_optimizer(TRAINER_DEFAULTS, generator.parameters(), TRAINER_DEFAULTS.learning_rate)
    opt_f = build_optimizer(TRAINER_DEFAULTS, networks.fake_score_parameters(), TRAINER_DEFAULTS.fake_score_learning_rate)
    sched_g = get_scheduler("constant", optimizer=opt_g)
    sched_f = get_scheduler("constant", optimizer=opt_f)
    generator_p, fake_p, opt_g, opt_f, sched_g, sched_f = accelerator.prepare(
        generator, networks.fake_score, opt_g, opt_f, sched_g, sched_f
    )
    if args.compile:
        for module in unique:
            module.compile()
    ema = None
    if not args.no_ema:
        ema = EMAModel(generator.parameters(), decay=TRAINER_DEFAULTS.ema_decay, model_cls=type(generator), model_config=generator.config)
        ema.to(device)

    # 3. One batch: random caption embeddings (the text-embedding cache's dtype is the weight dtype) and randomness
    b = args.batch_size
    embeds, mask, neg, neg_mask = configs.random_text_conditioning(config, b, device, weight_dtype, seed=args.seed)
    resolution = config["sample_size"] * 8
    cond = Conditioning(embeds, mask, neg, neg_mask, micro_conditions(generator, b, resolution, resolution, device, weight_dtype))
    gen = torch.Generator().manual_seed(args.seed)
    shape = (b, config["in_channels"], config["sample_size"], config["sample_size"])
    t_lo, t_hi = TRAINER_DEFAULTS.min_timestep, TRAINER_DEFAULTS.max_timestep + 1
    rnd = SampleRandomness(
        torch.randn(shape, generator=gen), torch.randint(t_lo, t_hi, (b,), generator=gen),
        torch.randn(shape, generator=gen), torch.randint(t_lo, t_hi, (b,), generator=gen), torch.randn(shape, generator=gen),
    ).to(device)
    return Setup(
        args, accelerator, device, weight_dtype, generator_p, networks, fake_p, opt_g, opt_f, sched_g, sched_f,
        list(generator_p.parameters()), [p for p in fake_p.parameters() if p.requires_grad], ema, cond, rnd,
        alphas_cumprod, t_star, get_divergence(args.divergence),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The training script's iteration


def _generate(s: Setup, with_graph: bool):
    from sim_diffusers.generator import one_step_generate

    c = s.cond
    with torch.set_grad_enabled(with_graph):
        return one_step_generate(s.generator, s.rnd.noise, s.t_star, s.alphas_cumprod, c.prompt_embeds, c.prompt_attention_mask, c.added_cond_kwargs)


def _apply_update(s: Setup, loss_values, optimizer, scheduler, parameters):
    """The script's `apply_update`: clip, NaN/Inf check of loss and gradients, step, zero the gradients."""
    from sim_diffusers.losses import is_finite

    grad_norm = s.accelerator.clip_grad_norm_(parameters, TRAINER_DEFAULTS.max_grad_norm)
    finite = is_finite(torch.stack(loss_values), *[p.grad for p in parameters if p.grad is not None])
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _apply_update_norm_check(s: Setup, loss_values, optimizer, scheduler, parameters):
    """Ablation: `_apply_update` with the NaN/Inf check read off the clipping norm (non-finite iff some gradient is)
    instead of a second pass over every gradient."""
    from sim_diffusers.losses import is_finite

    grad_norm = s.accelerator.clip_grad_norm_(parameters, TRAINER_DEFAULTS.max_grad_norm)
    finite = is_finite(torch.stack(loss_values), grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _no_mark(name):
    pass


def trainer_iteration(s: Setup, share_x0: bool = True, mark=_no_mark, apply_update=_apply_update):
    """One iteration of train_sim_pixart.py's loop (steps 5b, 5c, EMA, logging), accumulation 1, one process.

    share_x0=False takes the script's gradient-accumulation path: x0 without graph for the fake-score update, then
    generated again with its graph for the generator update. `mark(name)` is called after each step.
    """
    from sim_diffusers.training.step import fake_score_update_loss, generator_update_loss

    acc, rnd, cond = s.accelerator, s.rnd, s.cond
    with acc.autocast():
        # 5b. Fake-score update on detached generator samples
        x0 = _generate(s, with_graph=share_x0)
        mark("generator_forward")
        loss_f = fake_score_update_loss(s.networks, s.fake_module, x0, rnd.fake_timesteps, rnd.fake_noise, cond, s.alphas_cumprod)
        mark("fake_score_update_forward")
        acc.backward(loss_f)
        mark("fake_score_update_backward")
        apply_update(s, [loss_f.detach()], s.opt_f, s.sched_f, s.f_params)
        mark("fake_score_optimizer_step")
        # 5c. Generator update through the guided teacher and the frozen fake score
        if not share_x0:
            x0 = _generate(s, with_graph=True)
            mark("generator_forward_again")
        loss_g, stats = generator_update_loss(
            s.networks, x0, rnd.generator_timesteps, rnd.generator_noise, cond, s.alphas_cumprod,
            s.divergence, TRAINER_DEFAULTS.guidance_scale, TRAINER_DEFAULTS.loss_weighting,
        )
        mark("generator_loss_forward")
        acc.backward(loss_g)
        mark("generator_loss_backward")
        _, g_ok = apply_update(s, [loss_g.detach()], s.opt_g, s.sched_g, s.g_params)
        mark("generator_optimizer_step")
    if s.ema is not None and g_ok:
        s.ema.step(s.generator.parameters())
        mark("ema")
    logs = (loss_g.detach().item(), loss_f.detach().item(), stats["eps_gap"].item())  # the script logs these
    mark("logging")
    return logs


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

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def _isolated_passes(s: Setup, clock: Clock, ablations: bool):
    """Each essential pass of one iteration alone (see the module docstring); timed into `clock`."""
    net, cond, rnd = s.networks, s.cond, s.rnd
    acc = s.accelerator
    x_in = torch.randn_like(rnd.noise)
    with acc.autocast():
        # Generator forward with graph, backward from a random cotangent, then its AdamW step and the EMA.
        clock.start()
        x0 = _generate(s, with_graph=True)
        clock.mark("generator_forward")
        x0.backward(torch.randn_like(x0))
        clock.mark("generator_backward")
        s.opt_g.step()
        clock.mark("generator_optimizer_step")
        s.opt_g.zero_grad(set_to_none=True)
        if s.ema is not None:
            clock.start()
            s.ema.step(s.generator.parameters())
            clock.mark("ema")

        # Fake-score update: forward on a detached x_t, backward into its trainable weights, AdamW step.
        clock.start()
        eps = net.fake_eps(x_in, rnd.fake_timesteps, cond.cond, cond.added_cond_kwargs, module=s.fake_module)
        clock.mark("fake_score_update_forward")
        eps.backward(torch.randn_like(eps))
        clock.mark("fake_score_update_backward")
        s.opt_f.step()
        clock.mark("fake_score_optimizer_step")
        s.opt_f.zero_grad(set_to_none=True)

        # Generator loss: guided teacher and frozen fake score, each backpropagated to its input x_t only (dmd: both
        # run under no_grad, as generator_update_loss runs them, and have no backward).
        if not s.divergence.needs_input_grad:
            with net.fake_score_frozen(), torch.no_grad():
                clock.start()
                net.teacher_eps(x_in, rnd.generator_timesteps, cond.cond, cond.uncond, TRAINER_DEFAULTS.guidance_scale, cond.added_cond_kwargs)
                clock.mark("teacher_forward")
                net.fake_eps(x_in, rnd.generator_timesteps, cond.cond, cond.added_cond_kwargs)
                clock.mark("fake_score_forward")
            return
        with net.fake_score_frozen():
            x_t = x_in.clone().requires_grad_(True)
            clock.start()
            eps = net.teacher_eps(x_t, rnd.generator_timesteps, cond.cond, cond.uncond, TRAINER_DEFAULTS.guidance_scale, cond.added_cond_kwargs)
            clock.mark("teacher_forward")
            eps.backward(torch.randn_like(eps))
            clock.mark("teacher_backward")
            x_t = x_in.clone().requires_grad_(True)
            clock.start()
            eps = net.fake_eps(x_t, rnd.generator_timesteps, cond.cond, cond.added_cond_kwargs)
            clock.mark("fake_score_forward")
            eps.backward(torch.randn_like(eps))
            clock.mark("fake_score_backward")
            if ablations:
                x_t = x_in.clone().requires_grad_(True)
                clock.start()
                eps = _teacher_eps_two_forwards(s, x_t)
                clock.mark("ablation_teacher_two_forwards_forward")
                eps.backward(torch.randn_like(eps))
                clock.mark("ablation_teacher_two_forwards_backward")


def _teacher_eps_two_forwards(s: Setup, x_t):
    """The guided teacher epsilon as two forwards (uncond, cond) instead of guided_eps's one batched forward."""
    from sim_diffusers.generator import predict_eps

    net, cond, rnd = s.networks, s.cond, s.rnd
    dtype = net.teacher.dtype
    g = TRAINER_DEFAULTS.guidance_scale
    with net.teacher_mode():
        args = (x_t.to(dtype), rnd.generator_timesteps)
        eps_u = predict_eps(net.teacher, *args, cond.negative_prompt_embeds.to(dtype), cond.negative_prompt_attention_mask, cond.added_cond_kwargs)
        eps_c = predict_eps(net.teacher, *args, cond.prompt_embeds.to(dtype), cond.prompt_attention_mask, cond.added_cond_kwargs)
    return eps_u + g * (eps_c - eps_u)


def _time_call(clock: Clock, name: str, fn):
    clock.start()
    fn()
    clock.mark(name)


def _ema_and_adam_variants(s: Setup):
    """Benchmark-only copies of the EMA (foreach=True) and AdamW (fused=True) with the same hyperparameters."""
    from diffusers.training_utils import EMAModel

    params = [p for p in s.generator.parameters() if p.requires_grad]
    fused_ok = all(p.device.type in ("cuda", "cpu") for p in params)
    extras = {"ema_foreach": EMAModel(s.generator.parameters(), decay=TRAINER_DEFAULTS.ema_decay, foreach=True)}
    if fused_ok:
        d = TRAINER_DEFAULTS
        extras["adam_fused"] = torch.optim.AdamW(params, lr=d.learning_rate, betas=(d.adam_beta1, d.adam_beta2), weight_decay=d.adam_weight_decay, eps=d.adam_epsilon, fused=True)
    return extras


def run_rounds(s: Setup, rounds: int, ablations: bool, iteration_only: bool = False) -> Clock:
    clock = Clock(s.device)
    for _ in range(rounds):
        _time_call(clock, "iteration", lambda: trainer_iteration(s))
        if iteration_only:
            continue
        clock.start()
        trainer_iteration(s, mark=lambda name: clock.mark("segment/" + name))
        _isolated_passes(s, clock, ablations)
        if ablations:
            _time_call(clock, "ablation_iteration_recomputed_x0", lambda: trainer_iteration(s, share_x0=False))
            _time_call(clock, "ablation_iteration_finite_check_from_clip_norm", lambda: trainer_iteration(s, apply_update=_apply_update_norm_check))
            if "ema_foreach" in s.extras:
                _time_call(clock, "ablation_ema_foreach", lambda: s.extras["ema_foreach"].step(s.generator.parameters()))
            if "adam_fused" in s.extras:
                # Gradients for the fused AdamW come from one generator backward (not timed).
                with s.accelerator.autocast():
                    x0 = _generate(s, with_graph=True)
                    x0.backward(torch.randn_like(x0))
                _time_call(clock, "ablation_generator_adamw_fused", s.extras["adam_fused"].step)
                s.extras["adam_fused"].zero_grad(set_to_none=True)
    return clock


ESSENTIAL_PASSES = (
    "generator_forward", "generator_backward",
    "fake_score_update_forward", "fake_score_update_backward",
    "teacher_forward", "teacher_backward",
    "fake_score_forward", "fake_score_backward",
    "fake_score_optimizer_step", "generator_optimizer_step", "ema",
)


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def saved_activation_bytes(s: Setup) -> int:
    """Bytes of the tensors autograd holds at the iteration's peak: the generator's graph plus the generator loss's
    (teacher and F backpropagated to x_t), just before its backward. Counted exactly through saved-tensor hooks,
    each storage once, parameters excluded (autocast's low-precision weight copies are counted: they are held too).
    Under activation checkpointing the checkpoint keeps only block inputs, and that is what gets counted."""
    from sim_diffusers.training.step import generator_update_loss

    params = {p.untyped_storage().data_ptr() for m in (s.generator, s.networks.teacher, s.networks.fake_score) for p in m.parameters()}
    held: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = max(held.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    rnd, cond = s.rnd, s.cond
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), s.accelerator.autocast():
        x0 = _generate(s, with_graph=True)
        loss_g, _ = generator_update_loss(
            s.networks, x0, rnd.generator_timesteps, rnd.generator_noise, cond, s.alphas_cumprod,
            s.divergence, TRAINER_DEFAULTS.guidance_scale, TRAINER_DEFAULTS.loss_weighting,
        )
    del x0, loss_g
    return sum(held.values())


def static_memory(s: Setup) -> dict:
    """Bytes of parameters, gradients (as held at the peak: one per trainable parameter), optimiser states, EMA."""

    def state_bytes(opt):
        opt = getattr(opt, "optimizer", opt)  # AcceleratedOptimizer wraps the torch one
        return configs.tensor_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)

    gen, teacher = s.generator, s.networks.teacher
    out = {
        "generator_parameters": configs.tensor_bytes(gen.parameters()),
        "generator_gradients": configs.tensor_bytes(p for p in gen.parameters() if p.requires_grad),
        "generator_optimizer_states": state_bytes(s.opt_g),
        "ema": configs.tensor_bytes(s.ema.shadow_params) if s.ema is not None else 0,
        "fake_score_trainable_parameters": configs.tensor_bytes(s.f_params),
        "fake_score_gradients": configs.tensor_bytes(s.f_params),
        "fake_score_optimizer_states": state_bytes(s.opt_f),
        "teacher_parameters": configs.tensor_bytes(p for p in teacher.parameters() if not p.requires_grad),
    }
    if s.networks.lora:
        out["fake_score_trainable_parameters_note"] = "LoRA adapters inside the teacher module"
    out["total"] = sum(v for v in out.values() if isinstance(v, int))
    return out


# ---------------------------------------------------------------------------------------------------------------------


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def set_cpu_threads(args) -> None:
    """On CPU, one thread unless told otherwise: on a small machine shared with other jobs, two threads contending
    for two busy cores made the same pass vary up to 5x; one thread varies far less."""
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if args.num_threads or on_cpu:
        torch.set_num_threads(args.num_threads or 1)


def main(args) -> dict:
    set_cpu_threads(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    s = build(args)
    build_s = time.perf_counter() - t0
    rss_after_build = _rss_bytes()
    if args.ablations:
        s.extras = _ema_and_adam_variants(s)
    config = configs.transformer_config(args.config)

    # Warm-up (compilation, allocator growth), then the timed rounds.
    t0 = time.perf_counter()
    run_rounds(s, args.warmup, args.ablations, args.iteration_only)
    warmup_s = time.perf_counter() - t0
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    rss_before = _rss_bytes()
    clock = run_rounds(s, args.steps, args.ablations, args.iteration_only)
    med = clock.medians()

    # Memory
    memory = {"static_bytes": static_memory(s), "saved_for_backward_bytes_at_peak": saved_activation_bytes(s)}
    if s.device.type == "cuda":
        memory["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(s.device)
        memory["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(s.device)
        memory["method"] = "torch.cuda.max_memory_allocated over the timed rounds"
    else:
        memory["peak_rss_bytes"] = _peak_rss_bytes()
        memory["rss_after_build_bytes"] = rss_after_build
        memory["rss_before_timed_rounds_bytes"] = rss_before
        memory["method"] = ("CPU: ru_maxrss (process high-water mark); its rise over the RSS after building the networks "
                            "estimates gradients + optimiser states + EMA + activations")

    # FLOPs, throughput
    flops = configs.sim_iteration_flops(config, args.batch_size, TRAINER_DEFAULTS.guidance_scale, s.divergence.needs_input_grad, args.lora_rank)
    fwd = flops["generator_forward"]
    fake_fwd = configs.transformer_forward_flops(config, args.batch_size, lora_rank=args.lora_rank)
    teacher_fwd = 2 * fwd
    pass_flops = {
        "generator_forward": fwd, "generator_backward": 2 * fwd,
        "fake_score_update_forward": fake_fwd, "fake_score_update_backward": flops["fake_score_update"] - fake_fwd,
        "teacher_forward": teacher_fwd, "teacher_backward": teacher_fwd,
        "fake_score_forward": fake_fwd, "fake_score_backward": fake_fwd,
    }
    iteration_s = med["iteration"]
    essentials = {k: med[k] for k in ESSENTIAL_PASSES if k in med}
    essential_sum = sum(essentials.values()) or float("nan")
    tflops = flops["total"] / iteration_s / 1e12
    peak = configs.peak_bf16_tflops(device_name(s.device)) if s.device.type == "cuda" else None

    result = {
        "args": vars(args),
        "device": device_name(s.device),
        "torch": torch.__version__,
        "config": args.config,
        "parameters_per_transformer": configs.count_parameters(s.networks.teacher) - (configs.count_parameters(s.networks.teacher, True) if s.networks.lora else 0),
        "build_s": build_s,
        "warmup_s": warmup_s,
        "ms_per_iteration": iteration_s * 1e3,
        "samples_per_s": args.batch_size / iteration_s,
        "passes_ms": {k: v * 1e3 for k, v in essentials.items()},
        "essential_sum_ms": essential_sum * 1e3,
        # Per round: iteration / sum of that round's passes (same load); the median over rounds. And the ratio of medians.
        "overhead_ratio": _per_round_overhead(clock),
        "overhead_ratio_of_medians": iteration_s / essential_sum,
        "segments_ms": {k.split("/", 1)[1]: v * 1e3 for k, v in med.items() if k.startswith("segment/")},
        "ablations_ms": {k: v * 1e3 for k, v in med.items() if k.startswith("ablation_")},
        "all_samples_ms": {k: [x * 1e3 for x in v] for k, v in clock.samples.items()},
        "flops_per_iteration": flops,
        "pass_flops": pass_flops,
        "achieved_tflops": tflops,
        "peak_bf16_tflops": peak,
        "mfu": (tflops / peak) if peak else None,
        "memory": memory,
    }
    result["segments_sum_ms"] = sum(result["segments_ms"].values())
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _per_round_overhead(clock: Clock) -> float:
    rounds = len(clock.samples["iteration"])
    if not all(len(clock.samples.get(k, ())) == rounds for k in ESSENTIAL_PASSES if k in clock.samples) or "generator_forward" not in clock.samples:
        return float("nan")
    ratios = [clock.samples["iteration"][i] / sum(clock.samples[k][i] for k in ESSENTIAL_PASSES if k in clock.samples) for i in range(rounds)]
    return statistics.median(ratios)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def print_report(r: dict) -> None:
    a = r["args"]
    print(f"\n## SIM training iteration: {r['config']}, batch {a['batch_size']}, {a['precision']}, "
          f"checkpointing {'on' if a['gradient_checkpointing'] else 'off'}, fake score "
          f"{'LoRA r=' + str(a['lora_rank']) if a['lora_rank'] else 'full copy'}, divergence {a['divergence']}"
          f"{', compiled' if a['compile'] else ''}")
    print(f"device: {r['device']}; torch {r['torch']}; {r['parameters_per_transformer'] / 1e6:.2f} M parameters per transformer")
    print(f"{r['ms_per_iteration']:.1f} ms/iteration, {r['samples_per_s']:.2f} samples/s, "
          f"{r['flops_per_iteration']['total'] / 1e12:.4g} TFLOP/iteration -> {r['achieved_tflops']:.3g} TFLOP/s"
          + (f", MFU {100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} bf16" if r["mfu"] is not None else ""))
    print(f"overhead (iteration / sum of passes, median over rounds): {r['overhead_ratio']:.3f}; ratio of medians "
          f"{r['overhead_ratio_of_medians']:.3f} ({r['ms_per_iteration']:.1f} / {r['essential_sum_ms']:.1f} ms); "
          f"in-loop segments sum {r['segments_sum_ms']:.1f} ms")
    print("\n| pass (alone) | ms | TFLOP/s |\n|---|---:|---:|")
    for k, v in r["passes_ms"].items():
        f = r["pass_flops"].get(k)
        print(f"| {k} | {v:.2f} | {f / v / 1e9:.3g} |" if f else f"| {k} | {v:.2f} | |")
    print("\n| in-loop segment | ms |\n|---|---:|")
    for k, v in r["segments_ms"].items():
        print(f"| {k} | {v:.2f} |")
    if r["ablations_ms"]:
        print("\n| ablation | ms |\n|---|---:|")
        for k, v in r["ablations_ms"].items():
            print(f"| {k} | {v:.2f} |")
    m = r["memory"]
    if "peak_allocated_bytes" in m:
        print(f"\npeak CUDA memory allocated {_mib(m['peak_allocated_bytes'])} (reserved {_mib(m['peak_reserved_bytes'])})")
    else:
        print(f"\npeak RSS {_mib(m['peak_rss_bytes'])}; rise over RSS after build {_mib(m['peak_rss_bytes'] - m['rss_after_build_bytes'])}")
    print(f"saved for backward at the peak (activations, exact): {_mib(m['saved_for_backward_bytes_at_peak'])}")
    st = m["static_bytes"]
    print("static: " + ", ".join(f"{k} {_mib(v)}" for k, v in st.items() if isinstance(v, int)))


if __name__ == "__main__":
    main(parse_args())
