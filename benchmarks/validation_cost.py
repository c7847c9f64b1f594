#!/usr/bin/env python
"""What the trainer's validation against the teacher costs, next to a training step.

    python -m benchmarks.validation_cost --config mid                 # CPU, one thread: a few minutes
    python -m benchmarks.validation_cost --config xl-512 --precision bf16 --batch_size 8   # on a GPU

Times, on random networks of a named architecture (benchmarks/configs.py) placed and optimised as the trainer does
(`benchmarks.train_step.build`): one SIM training step (`SIMIteration` after the warm-up, median over --rounds), one
validation (`sim_diffusers.training.run._validate`, the trainer's own code: the generator on P prompts x N fixed
noises, the statistics, and the decoding of the image grid's generator row; median over --rounds) and, once, the
teacher's K-step ODE samples that the run caches. Prints each, the validation in training steps, and its share of
training time at the trainer's default frequency (every --validation_steps steps), with the FLOP count of both
(`benchmarks.configs`) for a device-independent view.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import configs, train_step
from sim_diffusers.training.validation import ValidationConfig, ValidationSet

DEFAULT = ValidationConfig()
DEFAULT_VALIDATION_STEPS = 500  # the trainer's --validation_steps


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mid", choices=configs.CONFIG_NAMES)
    parser.add_argument("--batch_size", type=int, default=4, help="Training samples per step (the trainer's 4).")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--num_prompts", type=int, default=4, help="Validation prompts.")
    parser.add_argument("--num_generator_steps", type=int, default=1, help="K of a K-step generator.")
    parser.add_argument("--num_samples", type=int, default=DEFAULT.num_samples, help="Noises per prompt (N).")
    parser.add_argument("--teacher_steps", type=int, default=DEFAULT.teacher_steps, help="K.")
    parser.add_argument("--num_images", type=int, default=4, help="Images per prompt in the grid.")
    parser.add_argument("--guidance_scale", type=float, default=4.5)
    parser.add_argument("--validation_steps", type=int, default=DEFAULT_VALIDATION_STEPS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT")
    return parser.parse_args(input_args)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn) -> float:
    _sync(device)
    tic = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - tic


def main(args) -> dict:
    from diffusers import DDPMScheduler

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.training.run import _validate

    torch.set_num_threads(args.num_threads)
    step_args = train_step.parse_args(
        ["--config", args.config, "--batch_size", str(args.batch_size), "--precision", args.precision, "--no_ema"]
        + ["--num_generator_steps", str(args.num_generator_steps)]
        + (["--device", args.device] if args.device else [])
    )
    s = train_step.build(step_args)
    generator = s.accelerator.unwrap_model(s.models.generator)
    vae_blocks = {"tiny": (8, 8, 8, 8), "mid": configs.MID_VAE_BLOCKS}.get(args.config, configs.SD_VAE_BLOCKS)
    one_step = SIMOneStepPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=configs.build_vae(vae_blocks, s.device, s.weight_dtype, seed=args.seed + 1),
        transformer=generator,
        scheduler=DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False),
        generator_timesteps=list(s.iteration.generator_timesteps),
    )
    embeds, mask, negative, negative_mask = configs.random_text_conditioning(
        dict(generator.config), args.num_prompts, s.device, s.weight_dtype, seed=args.seed
    )
    validation = ValidationSet([f"prompt {i}" for i in range(args.num_prompts)], embeds, mask, negative, negative_mask)

    with tempfile.TemporaryDirectory() as output_dir:
        trainer_args = argparse.Namespace(
            output_dir=output_dir,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            num_validation_images=args.num_images,
            validation_num_samples=args.num_samples,
            validation_teacher_steps=args.teacher_steps,
            validation_collapse_threshold=DEFAULT.collapse_threshold,
            validation_collapse_action="warn",
            pretrained_model_name_or_path=f"random-{args.config}",
            revision=None,
            variant=None,
            max_sequence_length=configs.TEXT_TOKENS,
            clean_caption=True,
        )
        config = ValidationConfig.from_namespace(trainer_args)

        def validate():
            return _validate(s.accelerator, trainer_args, config, one_step, s.models, validation, 1, s.ode_scheduler)

        first = validate()  # computes and caches the teacher's samples
        teacher_seconds = first.teacher_seconds
        validation_seconds, step_seconds = [], []
        sim_step = s.iteration.config.regression_warmup_steps  # the first step after the warm-up
        train_step.run_iteration(s, sim_step)  # warm-up of the kernels
        for r in range(args.rounds):
            step_seconds.append(_timed(s.device, lambda r=r: train_step.run_iteration(s, sim_step + r)))
            validation_seconds.append(_timed(s.device, validate))

    config_dict = dict(generator.config)
    forward = configs.transformer_forward_flops(config_dict, 1)
    step_flops = configs.sim_iteration_flops(
        config_dict,
        args.batch_size,
        args.guidance_scale,
        regression_samples=args.batch_size / 4,
        generator_steps=args.num_generator_steps,
    )["total"]
    # K generator calls per noise; decoding not counted (VAE)
    validation_flops = args.num_prompts * args.num_samples * args.num_generator_steps * forward
    teacher_flops = args.num_prompts * args.num_samples * args.teacher_steps * (2 if args.guidance_scale != 1 else 1)
    step, val = statistics.median(step_seconds), statistics.median(validation_seconds)
    result = {
        "config": args.config,
        "device": train_step.device_name(s.device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "num_prompts": args.num_prompts,
        "num_samples": args.num_samples,
        "num_generator_steps": args.num_generator_steps,
        "teacher_steps": args.teacher_steps,
        "num_images": args.num_images,
        "step_seconds": step,
        "validation_seconds": val,
        "teacher_samples_seconds": teacher_seconds,
        "validation_in_steps": val / step,
        "share_of_training_at_default_frequency": val / (args.validation_steps * step),
        "teacher_samples_in_steps": teacher_seconds / step,
        "step_tflop": step_flops / 1e12,
        "validation_transformer_tflop": validation_flops / 1e12,
        "teacher_samples_tflop": teacher_flops * forward / 1e12,
        "validation_in_steps_by_flops": validation_flops / step_flops,
    }
    print(
        f"{args.config} on {result['device']} ({args.precision}), training batch {args.batch_size}; validation: "
        f"{args.num_prompts} prompts x {args.num_samples} noises, {args.num_images} images per prompt decoded\n"
        f"  training step (SIM phase)     {step * 1e3:9.1f} ms   {step_flops / 1e12:.3g} TFLOP\n"
        f"  one validation                {val * 1e3:9.1f} ms   {validation_flops / 1e12:.3g} TFLOP (transformer)"
        f"  = {val / step:.2f} steps ({validation_flops / step_flops:.2f} by FLOPs)\n"
        f"  every {args.validation_steps} steps             {100 * val / (args.validation_steps * step):9.2f} % of "
        "training time\n"
        f"  teacher samples, once per run {teacher_seconds * 1e3:9.1f} ms   = {teacher_seconds / step:.1f} steps "
        f"({args.teacher_steps} DPM-Solver++ steps, cached)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(parse_args())
