#!/usr/bin/env python
"""Distil a PixArt-alpha teacher into a one-step generator with Score Implicit Matching (SIM), from captions alone.

    accelerate launch training_scripts/train_sim_pixart.py \\
        --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512 \\
        --caption_file captions.txt --output_dir sim-pixart-512 \\
        --train_batch_size 8 --max_train_steps 20000 --mixed_precision bf16 \\
        --gradient_checkpointing --text_embedding_cache t5-cache --use_ema

One iteration (Luo et al. 2024, Alg. 1, in epsilon form; `sim_diffusers.training.iteration.SIMIteration`):
  1. x0 = G(z, c): the one-step generator at the conditioning timestep t* (sim_diffusers.generator);
  2. fake-score update: F learns the generator's distribution by epsilon MSE on detached x0 at random t;
  3. generator update: the SIM divergence (sim_diffusers.losses) on x_t = alpha_t x0 + sigma_t eps with x0's graph,
     guided teacher epsilon and F's epsilon with F's parameters frozen; the gradient reaches G through both;
     plus, on one sample in --regression_every, the regression of x0 onto the guided teacher's ODE solution from the
     same noise (without it each caption collapses onto one of its modes; docs/ground_truth.md); during the first
     --regression_warmup_steps the generator learns from that regression alone, on every sample;
  4. EMA of G (optional).
This script sets the run up, calls the iteration once per step, and checkpoints, validates and logs.
Runs as `python train_sim_pixart.py ...` (one process) or under `accelerate launch` (DDP, multi-node).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

from sim_diffusers.losses import DEFAULT_T_MAX, DEFAULT_T_MIN
from sim_diffusers.training.iteration import IterationConfig
from sim_diffusers.training.run import OptimizerConfig
from sim_diffusers.training.validation import COLLAPSE_EXIT_CODE, VALIDATION_LOG_FILE, ValidationConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD_TEMPLATE = REPO_ROOT / "model_cards" / "sim_pixart.md"
logger = logging.getLogger("train_sim_pixart")
ITERATION, OPTIMIZER, VALIDATION = IterationConfig(), OptimizerConfig(), ValidationConfig()
# Regression warm-up of the generator before SIM starts (docs/ground_truth.md: on the ground-truth world it gives
# every metric a better start than SIM from the teacher's weights, and SIM keeps improving it from there).
DEFAULT_REGRESSION_WARMUP_STEPS = ITERATION.regression_warmup_steps


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`error: ...`), exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(input_args=None):
    parser = _OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_group in (
        _teacher_and_caption_args,
        _output_and_optimisation_args,
        _objective_args,
        _regression_args,
        _network_args,
        _run_args,
        _validation_against_teacher_args,
        _distribution_args,
    ):
        add_group(parser)
    args = parser.parse_args(input_args)
    if args.num_generator_steps is None:
        args.num_generator_steps = len(args.generator_timesteps) if args.generator_timesteps else 1
    if args.regression_warmup_steps is None:
        args.regression_warmup_steps = DEFAULT_REGRESSION_WARMUP_STEPS if args.regression_loss_weight > 0 else 0
    return args


def _teacher_and_caption_args(parser):
    g = parser.add_argument_group("teacher")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Hub id or local folder of a PixArt-alpha or PixArt-Σ pipeline (the teacher; its family is "
        "read from its model_index.json).",
    )
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant of the teacher's files, e.g. fp16.")
    g.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")

    g = parser.add_argument_group("captions (no images are needed)")
    g.add_argument(
        "--caption_file",
        default=None,
        help="A .txt file (one caption per line) or .csv/.jsonl/.json/.parquet with --caption_column. "
        "Lines that are not UTF-8 are skipped and counted.",
    )
    g.add_argument(
        "--dataset_name", default=None, help="A `datasets` dataset (Hub id or local folder) holding captions."
    )
    g.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    g.add_argument("--caption_column", default=None, help="Column with the captions (tables and datasets).")
    g.add_argument(
        "--clean_caption",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Clean captions as PixArt-alpha does (same default as the pipeline, so training and inference agree).",
    )
    g.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens per caption; default: the teacher family's (PixArt-alpha 120, PixArt-Σ 300).",
    )
    g.add_argument(
        "--text_embedding_cache",
        default=None,
        metavar="DIR",
        help="Encode every caption once with T5 into safetensors shards in DIR, then train without T5 in "
        "memory. Reused when it matches.",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Accepted for compatibility with diffusers scripts; captions stream from memory, so no worker "
        "processes are used.",
    )


def _output_and_optimisation_args(parser):
    g = parser.add_argument_group("output")
    g.add_argument(
        "--output_dir", default="sim-pixart", help="Where the pipeline, checkpoints, logs and model card go."
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the caption order, noise and timesteps (per sample, so independent of the number of processes).",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution; must match the teacher (512 or 1024); default: the teacher's.",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4, help="Samples per device per micro-step.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimiser step.")
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=10000,
        help="Optimiser steps in total; a resumed run may raise it to train longer.",
    )
    g.add_argument("--learning_rate", type=float, default=OPTIMIZER.learning_rate, help="Generator learning rate.")
    g.add_argument(
        "--fake_score_learning_rate",
        type=float,
        default=OPTIMIZER.fake_score_learning_rate,
        help="Fake-score learning rate (higher than the generator's: F must track the generator).",
    )
    g.add_argument(
        "--adam_beta1",
        type=float,
        default=OPTIMIZER.adam_beta1,
        help="Adam beta1 of both networks (0, as SiD: momentum on a moving target hurts).",
    )
    g.add_argument("--adam_beta2", type=float, default=OPTIMIZER.adam_beta2, help="Adam beta2 of both networks.")
    g.add_argument("--adam_weight_decay", type=float, default=OPTIMIZER.adam_weight_decay, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=OPTIMIZER.adam_epsilon, help="Adam epsilon.")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=ITERATION.max_grad_norm,
        help="Gradient clipping of both networks (<= 0 disables).",
    )
    g.add_argument(
        "--lr_scheduler",
        default=OPTIMIZER.lr_scheduler,
        help="diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...",
    )
    g.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=OPTIMIZER.lr_warmup_steps,
        help="Warm-up steps of the learning-rate schedule.",
    )
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    g.add_argument(
        "--max_consecutive_nonfinite_steps",
        type=int,
        default=10,
        help="Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).",
    )


def _objective_args(parser):
    g = parser.add_argument_group("SIM objective")
    g.add_argument(
        "--divergence",
        default=ITERATION.divergence,
        help="Generator objective: sim (pseudo-Huber, the paper's), sim_l2, sid, dmd.",
    )
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=ITERATION.guidance_scale,
        help="Classifier-free guidance of the teacher inside the loss (PixArt's default 4.5).",
    )
    g.add_argument(
        "--conditioning_timestep",
        type=int,
        default=None,
        help="t* of the one-step generator; default: VE sigma 2.5 (t = 440). Fixed for the model's life.",
    )
    g.add_argument(
        "--num_generator_steps",
        type=int,
        default=None,
        help="K: the generator calls the same network K times at decreasing timesteps, re-noising each x0 with fresh "
        "noise (1, the default, is the one-step generator). Trained by backward simulation: each sample trains one "
        "of the K calls, drawn per sample, the calls before it run without gradients. Default: the number of "
        "--generator_timesteps, else 1.",
    )
    g.add_argument(
        "--generator_timesteps",
        type=int,
        nargs="+",
        default=None,
        help="The K generator timesteps, strictly decreasing, the first being t*; saved with the pipeline. Default: "
        "t* then evenly spaced down to t*/K (K = 2: 440 220; K = 4: 440 330 220 110).",
    )
    g.add_argument(
        "--huber_c",
        type=float,
        default=ITERATION.huber_c,
        help="Pseudo-Huber c in score units; default scales with sqrt(latent elements) (sim_diffusers.losses).",
    )
    g.add_argument(
        "--sid_alpha",
        type=float,
        default=ITERATION.sid_alpha,
        help="alpha of --divergence sid (default: sim_diffusers.losses).",
    )
    g.add_argument(
        "--loss_weighting",
        default=ITERATION.loss_weighting,
        help="w(t) of the generator loss: sigma2, uniform, ... (sim_diffusers.losses).",
    )
    g.add_argument(
        "--latent_size_normalisation",
        action=argparse.BooleanOptionalAction,
        default=ITERATION.latent_size_normalisation,
        help="Scale the divergence and the regression term with the number D of latent elements so that each pulls "
        "on x0, and the two balance, as at the 4x8x8 latents the defaults were chosen at (docs/objective.md; "
        "--dry_run prints the factors). Without it the regression's pull relative to the divergence's is 8x weaker "
        "at 512 px and 16x at 1024 px.",
    )
    g.add_argument("--min_timestep", type=int, default=DEFAULT_T_MIN, help="Smallest t of both updates.")
    g.add_argument("--max_timestep", type=int, default=DEFAULT_T_MAX, help="Largest t of both updates.")


def _regression_args(parser):
    g = parser.add_argument_group("teacher-ODE regression and its warm-up")
    g.add_argument(
        "--regression_loss_weight",
        type=float,
        default=ITERATION.regression_loss_weight,
        help="Weight of the teacher-ODE regression term (DMD's) in the generator loss: it keeps every mode "
        "of each caption (plain SIM collapses to one; docs/ground_truth.md). 0 disables it.",
    )
    g.add_argument(
        "--regression_every",
        type=int,
        default=ITERATION.regression_every,
        help="One sample in N (by global sample index) also gets a regression target: the teacher's ODE "
        "from the generator's own noise.",
    )
    g.add_argument(
        "--regression_num_inference_steps",
        type=int,
        default=ITERATION.regression_num_inference_steps,
        help="DPM-Solver++ steps of the teacher for each regression target (2 forwards each with guidance, "
        "no backward).",
    )
    g.add_argument(
        "--regression_distance",
        default=ITERATION.regression_distance,
        choices=["l2", "pseudo_huber"],
        help="Distance of the regression term next to the divergence: l2 (mean squared error, DMD's; its "
        "pull grows with the error, which is what holds every mode against SIM's drive) or pseudo_huber.",
    )
    g.add_argument(
        "--regression_warmup_distance",
        default=ITERATION.regression_warmup_distance,
        choices=["pseudo_huber", "l2"],
        help="Distance of the regression term during the warm-up: pseudo_huber (the mean squared error for "
        "small errors, linear beyond c, so a blend of two modes is not favoured over committing to one; "
        "sharper and faster than l2 in docs/ground_truth.md) or l2.",
    )
    g.add_argument(
        "--regression_huber_c",
        type=float,
        default=ITERATION.regression_huber_c,
        help="c of the pseudo_huber regression distance, in latent units (default: 0.03 sqrt(latent "
        "elements), as --huber_c).",
    )
    g.add_argument(
        "--regression_warmup_steps",
        type=int,
        default=None,
        help="First N steps: the generator learns from the regression term alone, on every sample (no "
        "divergence), at --regression_warmup_learning_rate; the fake score trains as usual, so it is "
        f"current when the divergence starts. Default: {DEFAULT_REGRESSION_WARMUP_STEPS} with the "
        "regression term on, 0 with it off.",
    )
    g.add_argument(
        "--regression_warmup_learning_rate",
        type=float,
        default=ITERATION.regression_warmup_learning_rate,
        help="Generator learning rate during the regression warm-up (default: 10x --learning_rate).",
    )
    g.add_argument(
        "--regression_warmup_adam_beta1",
        type=float,
        default=ITERATION.regression_warmup_adam_beta1,
        help="Adam beta1 of the generator during the regression warm-up; --adam_beta1 again after it. A "
        "plain regression has a fixed target, so momentum helps it where SIM's moving target does not "
        "(docs/ground_truth.md).",
    )


def _network_args(parser):
    g = parser.add_argument_group("fake score and EMA")
    g.add_argument(
        "--fake_score_lora_rank",
        type=int,
        default=0,
        help="0: F is a full copy of the teacher. >0: F is a LoRA of this rank on the frozen teacher (peft), "
        "saving a model copy and its Adam states.",
    )
    g.add_argument("--fake_score_lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator; it is what gets saved.")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay.")


def _run_args(parser):
    g = parser.add_argument_group("precision and memory")
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: Accelerate's config. bf16 recommended on CUDA; trainable weights stay fp32.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer.")
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Checkpoint activations of G, F and (in the generator step) the teacher.",
    )
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention instead of PyTorch SDPA.",
    )

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or `latest`: the newest readable one (starts fresh when there is none). Resuming "
        "an earlier checkpoint than the newest moves the later ones aside into abandoned/ (never deleted).",
    )
    g.add_argument(
        "--allow_changed_arguments",
        action="store_true",
        help="Resume although settings that change what is learned (seed, objective, optimiser, global batch, "
        "teacher or captions) differ from the checkpoint's; they are applied and recorded. Learning rates and "
        "operational options are always applied on resume.",
    )

    g = parser.add_argument_group("validation")
    g.add_argument(
        "--validation_prompts",
        nargs="*",
        default=None,
        help="Prompts rendered every --validation_steps from the live generator.",
    )
    g.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (and at the end).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt (fixed seeds).")

    g = parser.add_argument_group("logging and Hub")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", default="logs", help="Tracker directory, relative to --output_dir.")
    g.add_argument("--tracker_project_name", default="sim-pixart", help="Project name of the trackers.")
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the pipeline, its model card and validation grid to the Hub at the end (never checkpoints, "
        "logs, caches or training records).",
    )
    g.add_argument("--hub_model_id", default=None, help="Repo id for --push_to_hub (default: output_dir's name).")
    g.add_argument(
        "--hub_token", default=None, help="Hub token (default: HF_TOKEN or the stored login). Never logged or saved."
    )
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    g.add_argument(
        "--dry_run",
        action="store_true",
        help="Validate arguments and inputs, print the resolved configuration, and exit.",
    )


def _distribution_args(parser):
    from sim_diffusers.training.models import SHARDING_STRATEGIES

    g = parser.add_argument_group("distribution and memory (docs/training.md, Scaling out)")
    g.add_argument(
        "--sharding",
        default="none",
        help="What each process holds: "
        + "; ".join(f"{name}: {what}" for name, what in SHARDING_STRATEGIES.items())
        + ". FSDP2 needs several processes (accelerate launch --multi_gpu); its checkpoints are gathered "
        "safetensors that resume on any number of processes.",
    )
    g.add_argument(
        "--gpu_memory_gb",
        type=float,
        default=80.0,
        help="Memory of one GPU as cards are sold (80 for an 80 GB A100 or H100, 141 for an H200; read as GiB): "
        "--dry_run's memory plan says whether the run fits it and, if not, the cheapest change that does.",
    )


def _validation_against_teacher_args(parser):
    g = parser.add_argument_group(
        "validation against the teacher (sim_diffusers.training.validation; docs/training.md, 'Is my run working?')"
    )
    g.add_argument(
        "--validation_num_samples",
        type=int,
        default=VALIDATION.num_samples,
        help="Fixed noises per validation prompt (from --seed) on which the generator is compared with the teacher's "
        "ODE samples from the same noises; the first --num_validation_images are shown.",
    )
    g.add_argument(
        "--validation_teacher_steps",
        type=int,
        default=VALIDATION.teacher_steps,
        help="DPM-Solver++ steps of the teacher's samples (computed once per run, cached in OUTPUT_DIR/logs).",
    )
    g.add_argument(
        "--validation_collapse_threshold",
        type=float,
        default=VALIDATION.collapse_threshold,
        help="Warn when a prompt's diversity ratio (the generator's spread over the teacher's on the same noises) "
        "falls below this.",
    )
    g.add_argument(
        "--validation_collapse_action",
        default=VALIDATION.collapse_action,
        help="On a possible collapse: warn (a line on stderr) or stop (save a checkpoint and exit with code "
        f"{COLLAPSE_EXIT_CODE}).",
    )


def main(args):
    # Heavy imports after argument parsing, so that --help and argument errors are instant.
    from sim_diffusers.training.captions import UserInputError
    from sim_diffusers.training.checks import validate

    # 0. Validate everything cheap before touching a model or a GPU
    try:
        caption_set, teacher_facts, resume_path = validate(args)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        from sim_diffusers.training.hub import public_arguments
        from sim_diffusers.training.memory import format_plan, memory_plan, plan_report, run_spec_from_arguments

        # The memory plan per GPU (architecture from the teacher's configs, world size from the launcher): JSON on
        # stdout with the rest, and for a person on stderr. Under a launcher only the first process prints.
        plan = memory_plan(run_spec_from_arguments(args))
        facts = {"num_captions": len(caption_set.captions), "resume": str(resume_path), **teacher_facts}
        # The objective at this latent size: pseudo-Huber scales, each term's factor, the regression:divergence balance
        facts["objective"] = IterationConfig.from_namespace(args).at_latent_size(teacher_facts["latent_shape"])
        facts["resolved_generator_timesteps"] = resolve_generator_timesteps(args, load_teacher_scheduler(args))
        facts["memory_plan"] = plan_report(plan, args.gpu_memory_gb)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(plan, args.gpu_memory_gb), file=sys.stderr)
            print(json.dumps({**public_arguments(vars(args)), **facts}, indent=2))
        return 0
    return train_in_claimed_output_dir(args, caption_set, teacher_facts, resume_path)


def train_in_claimed_output_dir(args, caption_set, teacher_facts, resume_path) -> int:
    """Train while holding output_dir's lock, after setting aside the branch a resume abandons and recording the run
    (sim_diffusers/training/lineage.py). Exit codes: 0 trained and saved; 2 bad input or output_dir in use; 3
    non-finite: stopped, or no model worth saving (one `error:` line naming the last good checkpoint)."""
    from sim_diffusers.training.captions import UserInputError
    from sim_diffusers.training.lineage import claim_output_dir, is_global_rank_zero
    from sim_diffusers.training.run import NonFiniteTraining

    try:
        with claim_output_dir(args, resume_path, teacher_facts, caption_set):
            return train(args, caption_set, teacher_facts, resume_path)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteTraining as err:
        if is_global_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        return 3


def train(args, caption_set, teacher_facts, resume_path):
    from tqdm.auto import tqdm

    from sim_diffusers.sampling import ode_scheduler
    from sim_diffusers.training import faults
    from sim_diffusers.training.captions import CaptionStream
    from sim_diffusers.training.iteration import SIMIteration
    from sim_diffusers.training.lineage import run_record
    from sim_diffusers.training.run import (
        StepBatches,
        StepLog,
        TrainingState,
        check_trained_generator,
        log_validation,
        register_checkpoint_hooks,
        resume_from_checkpoint,
    )

    accelerator, output_dir, weight_dtype = set_up(args)
    device = accelerator.device

    # 1. Teacher T (frozen, weight dtype), generator G and fake score F (fp32 master weights)
    teacher_pipe, one_step, networks = build_networks(args, device, weight_dtype)
    generator, t_star = one_step.transformer, one_step.conditioning_timestep
    generator_timesteps = one_step.generator_timesteps
    alphas_cumprod = one_step.scheduler.alphas_cumprod.to(device)

    # 2. Text conditioning: T5 online, or a safetensors cache built once (then T5 leaves memory)
    text, validation = build_text_conditioning(args, accelerator, teacher_pipe, caption_set, weight_dtype)

    # 3. Optimisers and schedules of both networks, prepared for distribution; EMA of G
    models = build_training_models(args, accelerator, generator, networks)

    # 4. Resume: weights, optimisers, schedules, RNG and the caption-stream position (= the step); then this run's
    # learning rates (and accepted changes). Each checkpoint records this run (arguments, content fingerprints).
    state = TrainingState(run=run_record(args, teacher_facts, caption_set, accelerator.num_processes))
    register_checkpoint_hooks(accelerator, generator, networks, models.ema, state)
    resume_from_checkpoint(accelerator, args, models, state, resume_path)

    # 5. The iteration, and the samples of each step (per-sample randomness from (seed, position): independent of
    # the world size)
    fault_plan = faults.from_environment()
    iteration = SIMIteration(
        IterationConfig.from_namespace(args),
        generator_timesteps,
        alphas_cumprod,
        ode_scheduler(teacher_pipe.scheduler),
        fault_plan,
    )
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    stream = CaptionStream(
        caption_set.captions, args.seed, global_batch, args.min_timestep, args.max_timestep, len(generator_timesteps)
    )
    latent_side = teacher_facts["native_resolution"] // one_step.vae_scale_factor
    batches = StepBatches(
        stream,
        text,
        generator,
        teacher_facts["native_resolution"],
        (generator.config.in_channels, latent_side, latent_side),
        args.train_batch_size,
        args.gradient_accumulation_steps,
        accelerator.process_index,
        accelerator.num_processes,
        device,
        weight_dtype,
    )
    step_log = StepLog(output_dir / "logs" / "steps.jsonl", state.step, enabled=accelerator.is_main_process)
    validation_log = StepLog(output_dir / VALIDATION_LOG_FILE, state.step, enabled=accelerator.is_main_process)
    progress = tqdm(
        range(args.max_train_steps),
        initial=state.step,
        desc="SIM steps",
        disable=not accelerator.is_local_main_process,
    )
    tic, validation_postfix = time.perf_counter(), {}
    validate = partial(
        log_validation,
        accelerator,
        args,
        one_step,
        models,
        validation,
        validation_log,
        ode_scheduler=iteration.ode_scheduler,
        teacher_fingerprint=teacher_facts["fingerprint"]["teacher"],
    )
    if args.validation_prompts and state.step == 0:  # the untrained generator: the baseline of every curve
        checked, _ = validate(0)
        validation_postfix = checked.postfix() if checked is not None else validation_postfix

    # 6. Training loop
    while state.step < args.max_train_steps:
        result = iteration(state.step, models, batches(state.step), accelerator)
        state.advance(result)
        logs = {**result.logs(), **{f"nonfinite_skipped/{k}": v for k, v in state.skipped.items()}}
        accelerator.log(logs, step=state.step)
        step_log.write(state.step, logs)
        progress.update(1)
        progress.set_postfix(
            g=f"{logs['loss/generator']:.3g}",
            f=f"{logs['loss/fake_score']:.3g}",
            samples_s=f"{global_batch * progress.n / max(time.perf_counter() - tic, 1e-9):.1f}",
            **validation_postfix,
        )
        if state.consecutive_bad >= args.max_consecutive_nonfinite_steps:
            return stop_on_nonfinite_steps(accelerator, output_dir, state)
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            save_checkpoint(accelerator, args, output_dir, state, fault_plan)
        if args.validation_prompts and (state.step % args.validation_steps == 0 or state.step == args.max_train_steps):
            checked, stop = validate(state.step)
            validation_postfix = checked.postfix() if checked is not None else validation_postfix
            if stop:
                progress.close()
                return stop_on_collapse(accelerator, args, output_dir, state, fault_plan)

    # 7. Save the one-step pipeline (EMA weights when --use_ema), the model card, and push; only a generator that
    # trained and is finite (otherwise exit 3, naming the last good checkpoint)
    accelerator.wait_for_everyone()
    check_trained_generator(accelerator, models, state, output_dir)
    save_final_pipeline(args, accelerator, models, one_step, teacher_pipe, output_dir, fault_plan)
    if accelerator.is_main_process:
        write_model_card(args, output_dir, t_star, state.step, teacher_facts["teacher_family"], generator_timesteps)
    leave_together(accelerator)  # the upload needs no group
    if accelerator.is_main_process and args.push_to_hub:
        push(args, output_dir)
    return 0


def set_up(args):
    """Accelerate (a gloo group when several CPU processes are launched; the sharded variant under --sharding), the
    output folder (its record of the run is written by lineage.claim_output_dir), TF32, and the weight dtype of the
    frozen networks."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sim_diffusers.training import checkpointing
    from sim_diffusers.training.distributed import ShardedAccelerator
    from sim_diffusers.training.hub import public_arguments

    output_dir = Path(args.output_dir)
    # Sharded networks get the accelerator whose no_sync and clipping work on FSDP2 modules (and nothing to prepare).
    accelerator = (Accelerator if args.sharding == "none" else ShardedAccelerator)(
        cpu=multi_process_without_accelerator(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.clear_temporary(output_dir)  # leftovers of a save interrupted by a crash
        tracker_config = {
            k: v for k, v in public_arguments(vars(args)).items() if isinstance(v, (int, float, str, bool))
        }
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    accelerator.wait_for_everyone()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, output_dir, weight_dtype


def build_networks(args, device, weight_dtype):
    """(teacher pipeline, one-step pipeline whose transformer is G, ScoreNetworks of T and F), on `device`, sharded
    over the processes under --sharding."""
    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.teachers import load_teacher_pipeline
    from sim_diffusers.training.distributed import sharding_for
    from sim_diffusers.training.models import ScoreNetworks, cast_trainable_to_fp32, place_networks
    from sim_diffusers.training.run import needs_text_encoder

    load_kwargs = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    teacher_pipe = load_teacher_pipeline(
        args.pretrained_model_name_or_path,
        dtype=weight_dtype,
        **load_kwargs,
        **({} if needs_text_encoder(args) else {"text_encoder": None}),
    )
    one_step = SIMOneStepPipeline.from_teacher(
        teacher_pipe,
        max_sequence_length=args.max_sequence_length,
        generator_timesteps=resolve_generator_timesteps(args, teacher_pipe.scheduler),
    )
    generator = cast_trainable_to_fp32(one_step.transformer.requires_grad_(True)).train()
    networks = ScoreNetworks.build(
        teacher_pipe.transformer, args.fake_score_lora_rank, args.fake_score_lora_alpha, seed=args.seed
    )
    teacher_pipe.vae.requires_grad_(False).eval().to(device)
    place_networks(
        generator,
        networks,
        device,
        args.gradient_checkpointing,
        args.enable_xformers_memory_efficient_attention,
        sharding=sharding_for(args.sharding, device, weight_dtype),
    )
    return teacher_pipe, one_step, networks


def build_text_conditioning(args, accelerator, teacher_pipe, caption_set, weight_dtype):
    """(captions -> T5 embeddings, the validation prompts' embeddings or None). With the embedding cache every
    caption is encoded once and T5 leaves memory for the whole run."""
    import torch

    from sim_diffusers.training.run import load_text_conditioning, validation_embeddings

    text = load_text_conditioning(args, accelerator, teacher_pipe, caption_set.captions, weight_dtype)
    validation = validation_embeddings(args, text)
    if args.text_embedding_cache is not None:
        teacher_pipe.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return text, validation


def build_training_models(args, accelerator, generator, networks):
    """Optimisers and learning-rate schedules of G and F, prepared for distribution, and the EMA of G. Sharded
    networks are not prepared (FSDP2 already distributes them) and get checkpoint hooks for their sharded state."""
    from diffusers.training_utils import EMAModel

    from sim_diffusers.training.distributed import ShardedEMAModel, register_sharded_checkpoint_hooks
    from sim_diffusers.training.iteration import TrainingModels
    from sim_diffusers.training.models import is_sharded, unsharded_class
    from sim_diffusers.training.run import build_optimisation

    sharded = is_sharded(generator)
    # A prepared scheduler steps once per process per optimiser step; an unprepared one once.
    optimisation = build_optimisation(
        OptimizerConfig.from_namespace(args),
        generator,
        networks,
        args.max_train_steps,
        1 if sharded else accelerator.num_processes,
    )
    if sharded:
        generator_ddp, fake_ddp, (opt_g, opt_f, sched_g, sched_f) = generator, networks.fake_score, optimisation
    else:
        generator_ddp, fake_ddp, opt_g, opt_f, sched_g, sched_f = accelerator.prepare(
            generator, networks.fake_score, *optimisation
        )
    ema = None
    if args.use_ema:
        ema = (ShardedEMAModel if sharded else EMAModel)(
            generator.parameters(),  # under FSDP2 the shards: the EMA is sharded like G
            decay=args.ema_decay,
            model_cls=unsharded_class(generator),
            model_config=generator.config,
            foreach=True,
        )
        ema.to(accelerator.device)
    models = TrainingModels(generator_ddp, networks, fake_ddp, opt_g, sched_g, opt_f, sched_f, ema)
    if sharded:
        register_sharded_checkpoint_hooks(accelerator, models)
    return models


def load_teacher_scheduler(args):
    """The teacher's noise schedule alone (a small config file), for what needs it before any model loads."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )


def resolve_generator_timesteps(args, teacher_scheduler) -> list[int]:
    """The generator's timesteps: --generator_timesteps, else t* (--conditioning_timestep, default VE sigma 2.5) and
    `default_generator_timesteps` for --num_generator_steps calls."""
    from sim_diffusers.generator import default_generator_timesteps
    from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, timestep_for_ve_sigma

    if args.generator_timesteps:
        return list(args.generator_timesteps)
    t_star = args.conditioning_timestep
    if t_star is None:
        t_star = timestep_for_ve_sigma(alphas_cumprod_of(teacher_scheduler), DEFAULT_SIGMA_INIT)
    return default_generator_timesteps(t_star, args.num_generator_steps)


def leave_together(accelerator) -> None:
    """End the run on every process at once: one that tore the process group down while the main process was still
    saving could hang for good in the teardown."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def stop_on_nonfinite_steps(accelerator, output_dir, state) -> int:
    """Exit code 3 and one line naming the last good checkpoint."""
    from sim_diffusers.training import checkpointing

    last = checkpointing.latest_checkpoint(output_dir)
    if accelerator.is_main_process:
        print(
            f"error: {state.consecutive_bad} consecutive non-finite steps, the last at step {state.step - 1}; "
            "stopping. "
            f"Last good checkpoint: {last if last else 'none'}.",
            file=sys.stderr,
        )
    leave_together(accelerator)
    return 3


def stop_on_collapse(accelerator, args, output_dir, state, fault_plan) -> int:
    """--validation_collapse_action stop: a checkpoint of this step (unless the loop has just saved one), one line,
    exit code COLLAPSE_EXIT_CODE."""
    if state.step % args.checkpointing_steps != 0 and state.step != args.max_train_steps:
        save_checkpoint(accelerator, args, output_dir, state, fault_plan)
    if accelerator.is_main_process:
        print(
            f"error: stopping at step {state.step} on a possible mode collapse (--validation_collapse_action stop); "
            f"saved checkpoint-{state.step}; the values are in {VALIDATION_LOG_FILE}.",
            file=sys.stderr,
        )
    leave_together(accelerator)
    return COLLAPSE_EXIT_CODE


def multi_process_without_accelerator() -> bool:
    """`accelerate launch --multi_gpu` on a machine without GPUs: Accelerate needs cpu=True to form a gloo group
    (otherwise every process silently trains alone)."""
    import torch
    from accelerate.utils import is_npu_available, is_xpu_available

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return distributed and not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


def save_checkpoint(accelerator, args, output_dir, state, fault_plan):
    """Write into a temporary folder on every rank, publish atomically, then prune the oldest."""
    from sim_diffusers.training import checkpointing

    tmp = checkpointing.temporary_checkpoint_dir(output_dir, state.step)
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    fault_plan.maybe_kill("checkpoint", state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)
        path = checkpointing.commit_checkpoint(tmp, state.step)
        logger.info("Saved %s", path)
        # Pruned only now, so a crash at any moment leaves at least the newest complete checkpoint.
        checkpointing.prune_checkpoints(output_dir, args.checkpoints_total_limit, keep=path)
    accelerator.wait_for_everyone()


def save_final_pipeline(args, accelerator, models, one_step, teacher_pipe, output_dir, fault_plan):
    """The one-step pipeline (EMA weights when kept), written once into a temporary folder, completed there with the
    teacher's T5 files, and only then published (atomically) into output_dir. Called on every process (sharded
    weights are gathered); the main process writes."""
    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.training import checkpointing
    from sim_diffusers.training.distributed import final_generator
    from sim_diffusers.training.run import copy_teacher_text_encoder

    final = final_generator(accelerator, models)
    if final is None:
        return
    vae = teacher_pipe.vae
    pipe = SIMOneStepPipeline(
        tokenizer=teacher_pipe.tokenizer,
        text_encoder=None,
        vae=vae,
        transformer=final.float(),
        scheduler=one_step.scheduler,
        max_sequence_length=args.max_sequence_length,
        generator_timesteps=one_step.generator_timesteps,
    )

    def add_teacher_text_encoder(folder):
        copy_teacher_text_encoder(args, folder)
        fault_plan.maybe_kill("final_save", 0)

    vae_dtype = vae.dtype
    vae.float()  # saved at full precision, as the teacher ships it
    checkpointing.save_pipeline_atomically(pipe, output_dir, finalize=add_teacher_text_encoder)
    vae.to(vae_dtype)


def write_model_card(args, output_dir, t_star, steps, teacher_family, generator_timesteps=None):
    from sim_diffusers.training.hub import render_model_card
    from sim_diffusers.training.validation import last_validation

    grid = output_dir / "validation" / "latest.png"
    render_model_card(
        MODEL_CARD_TEMPLATE,
        output_dir,
        # A local teacher folder has no Hub id to link; the card then names no base_model.
        base_model=None if Path(args.pretrained_model_name_or_path).exists() else args.pretrained_model_name_or_path,
        repo_id=args.hub_model_id,
        conditioning_timestep=t_star,
        generator_timesteps=generator_timesteps,
        teacher_family=teacher_family,
        settings={**vars(args), "trained_steps": steps},
        validation_image="validation/latest.png" if grid.exists() else None,
        validation_prompts=args.validation_prompts,
        use_ema=args.use_ema,
        validation_values=last_validation(output_dir),
    )


def push(args, output_dir):
    from sim_diffusers.training.hub import push_output_dir, resolve_token, retry_command

    hub_model_id = args.hub_model_id or output_dir.resolve().name
    try:
        repo_id = push_output_dir(output_dir, hub_model_id, resolve_token(args.hub_token), args.hub_private_repo)
        logger.info("Pushed %s to %s", output_dir, repo_id)
    except Exception as err:  # noqa: BLE001 - the local result is complete; say how to retry the upload alone
        print(
            f"error: upload to {hub_model_id} failed ({type(err).__name__}); {output_dir} is complete. Retry with: "
            + retry_command(output_dir, hub_model_id, args.hub_private_repo),
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main(parse_args()))
