#!/usr/bin/env python
"""Fast in-process screening of SIM settings on the ground-truth teacher (no accelerate launch, no checkpoints).

    python -m research.screen --name default --steps 1400 --eval_every 200
    python -m research.screen --name plain --steps 600 --regression_loss_weight 0
    python -m research.screen --name drop_anchor --regression_until 1000 --init_generator FIT.safetensors

The iteration is the trainer's own (`sim_diffusers.training.iteration.SIMIteration`, every `IterationConfig` field an
option of the same name, the trainer's default unless set), on the trainer's caption stream and optimisers, in one
process (`LocalOps`). What the screen adds: it scores the live generator every --eval_every steps on the benchmark's
held-out noise (256 samples per caption, as `python -m benchmarks.ground_truth.distill`), it can start the generator
from saved weights or deeper than the teacher, and it can drop the regression term after a step (--regression_until).
It appends one JSON line per run to --out. `benchmarks.ground_truth.distill` (the real trainer through `accelerate
launch`, reloaded with `from_pretrained`) remains the benchmark whose numbers the docs rest on.

Defaults that differ from the trainer's are the benchmark's (`benchmarks.ground_truth.distill.TRAINER_DEFAULTS`):
guidance 1 (the world is what the unguided teacher samples), batch 32, learning rates G 1e-5, F 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch

from research._common import (
    add_extra_layers_arg,
    add_world_and_teacher_args,
    append_record,
    deepen,
    load_teacher_setup,
    load_weights,
    sample_and_score,
    save_weights,
)
from sim_diffusers.training.iteration import IterationConfig

REPO = Path(__file__).resolve().parents[1]
# The ground-truth benchmark's settings where they differ from the trainer's defaults.
BENCHMARK_DEFAULTS = {"guidance_scale": 1.0, "learning_rate": 1e-5, "fake_score_learning_rate": 1e-4}


def parse_args(input_args=None):
    from sim_diffusers.losses import DEFAULT_T_MAX, DEFAULT_T_MIN
    from sim_diffusers.training.run import OptimizerConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_teacher_args(parser)
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption at each evaluation.")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditioning_timestep", type=int, default=None, help="t*; default VE sigma 2.5 (t = 440).")
    parser.add_argument("--min_timestep", type=int, default=DEFAULT_T_MIN)
    parser.add_argument("--max_timestep", type=int, default=DEFAULT_T_MAX)
    group = parser.add_argument_group("the trainer's iteration and optimisers (its options of the same names)")
    for config in (IterationConfig(), OptimizerConfig()):
        for f in dataclasses.fields(config):
            default = BENCHMARK_DEFAULTS.get(f.name, getattr(config, f.name))
            kind = (
                {"bool": _boolean, "int": int, "float": float, "str": str}[type(default).__name__]
                if default is not None
                else float
            )
            group.add_argument(f"--{f.name}", type=kind, default=default)
    parser.add_argument(
        "--regression_until",
        type=int,
        default=None,
        help="Train without the regression term from this step on (the warm-up, if any, still runs).",
    )
    parser.add_argument("--ema_decay", type=float, default=None, help="Also score an EMA of the generator's weights.")
    add_extra_layers_arg(parser)
    parser.add_argument(
        "--init_generator",
        default=None,
        help="Start the generator from these weights (safetensors), e.g. fit_ode_map.py --save.",
    )
    parser.add_argument("--save", default=None, help="Save the final generator's weights here (safetensors).")
    parser.add_argument("--out", default=str(REPO / "outputs" / "ground_truth" / "screen.jsonl"))
    args = parser.parse_args(input_args)
    if args.regression_until is not None and args.regression_until < args.regression_warmup_steps:
        parser.error("--regression_until must not end the regression term inside its warm-up")
    return args


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


class WorldText:
    """Captions -> their T5 embeddings, looked up in the world's encoded captions; `negative()` is the empty
    prompt's (the interface of the trainer's text encoders)."""

    def __init__(self, world, embeddings):
        self.index = {caption: i for i, caption in enumerate(world.captions)}
        self.embeds, self.mask, self.empty_embeds, self.empty_mask = embeddings

    def __call__(self, captions):
        idx = torch.tensor([self.index[c] for c in captions])
        return self.embeds[idx], self.mask[idx]

    def negative(self):
        return self.empty_embeds, self.empty_mask


def main(args):
    from diffusers.training_utils import EMAModel

    from sim_diffusers.sampling import ode_scheduler
    from sim_diffusers.training.captions import CaptionStream
    from sim_diffusers.training.iteration import LocalOps, SIMIteration, TrainingModels
    from sim_diffusers.training.models import ScoreNetworks
    from sim_diffusers.training.run import OptimizerConfig, StepBatches, build_optimisation

    world, _, teacher_pipe, embeddings, one_step = load_teacher_setup(args)
    teacher = teacher_pipe.transformer
    generator = deepen(copy.deepcopy(teacher), args.extra_layers).train().requires_grad_(True)
    if args.init_generator:
        load_weights(generator, args.init_generator)
    networks = ScoreNetworks.build(copy.deepcopy(teacher), seed=args.seed)
    models = TrainingModels(
        generator,
        networks,
        networks.fake_score,
        *_interleave(build_optimisation(OptimizerConfig.from_namespace(args), generator, networks, args.steps)),
        EMAModel(generator.parameters(), decay=args.ema_decay, foreach=True) if args.ema_decay is not None else None,
    )
    config = IterationConfig.from_namespace(args)
    scheduler, t_star = ode_scheduler(teacher_pipe.scheduler), one_step.conditioning_timestep
    alphas_cumprod = one_step.scheduler.alphas_cumprod
    iteration = SIMIteration(config, t_star, alphas_cumprod, scheduler)
    without_anchor = SIMIteration(
        dataclasses.replace(config, regression_loss_weight=0.0), t_star, alphas_cumprod, scheduler
    )
    stream = CaptionStream(
        list(world.captions), args.seed, args.train_batch_size, args.min_timestep, args.max_timestep
    )
    side = world.latent_shape[1]
    batches = StepBatches(
        stream,
        WorldText(world, embeddings),
        generator,
        side * one_step.vae_scale_factor,
        world.latent_shape,
        args.train_batch_size,
        1,
        0,
        1,
        "cpu",
        torch.float32,
    )
    ops = LocalOps()
    torch.manual_seed(args.seed)

    def evaluate(step):
        row = {"step": step, **sample_and_score(one_step, generator, world, args.num_samples)[1]}
        if models.ema is not None:
            ema_generator = copy.deepcopy(generator)
            models.ema.copy_to(ema_generator.parameters())
            row["ema"] = sample_and_score(one_step, ema_generator, world, args.num_samples)[1]
        print(args.name, row, f"{time.time() - start:.0f}s", flush=True)
        return row

    start = time.time()
    curve = [evaluate(0)]
    for step in range(args.steps):
        anchored = args.regression_until is None or step < args.regression_until
        (iteration if anchored else without_anchor)(step, models, batches(step), ops)
        if (step + 1) % args.eval_every == 0:
            curve.append(evaluate(step + 1))
    if args.save:
        save_weights(generator, args.save)
    append_record(args, curve, start)


def _interleave(optimisation):
    """build_optimisation's (opt_g, opt_f, sched_g, sched_f) in TrainingModels' order: opt_g, sched_g, opt_f,
    sched_f."""
    opt_g, opt_f, sched_g, sched_f = optimisation
    return opt_g, sched_g, opt_f, sched_f


if __name__ == "__main__":
    main(parse_args())
