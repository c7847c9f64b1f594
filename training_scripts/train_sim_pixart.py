#!/usr/bin/env python
"""Distil a PixArt-alpha teacher into a one-step generator with Score Implicit Matching (SIM), from captions alone.

    accelerate launch training_scripts/train_sim_pixart.py \\
        --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512 \\
        --caption_file captions.txt --output_dir sim-pixart-512 \\
        --train_batch_size 8 --max_train_steps 20000 --mixed_precision bf16 \\
        --gradient_checkpointing --text_embedding_cache t5-cache --use_ema

One iteration (Luo et al. 2024, Alg. 1, in epsilon form):
  1. x0 = G(z, c): the one-step generator at the conditioning timestep t* (sim_diffusers.generator);
  2. fake-score update: F learns the generator's distribution by epsilon MSE on detached x0 at random t;
  3. generator update: the SIM divergence (sim_diffusers.losses) on x_t = alpha_t x0 + sigma_t eps with x0's graph,
     guided teacher epsilon and F's epsilon with F's parameters frozen; the gradient reaches G through both;
     plus, on one sample in --regression_every, the regression of x0 onto the guided teacher's ODE solution from the
     same noise (without it each caption collapses onto one of its modes; docs/ground_truth.md); during the first
     --regression_warmup_steps the generator learns from that regression alone, on every sample;
  4. EMA of G (optional).
x0 is computed once and shared by both updates (G does not change in between); see sim_diffusers/training/step.py.
Runs as `python train_sim_pixart.py ...` (one process) or under `accelerate launch` (DDP, multi-node, FSDP).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD_TEMPLATE = REPO_ROOT / "model_cards" / "sim_pixart.md"
logger = logging.getLogger("train_sim_pixart")
# Regression warm-up of the generator before SIM starts (docs/ground_truth.md: on the ground-truth world it gives
# every metric a better start than SIM from the teacher's weights, and SIM keeps improving it from there).
DEFAULT_REGRESSION_WARMUP_STEPS = 1000


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`error: ...`), exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(input_args=None):
    parser = _OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = parser.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local folder of a PixArt-alpha or PixArt-Σ pipeline (the teacher; its family is read from its model_index.json).")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant of the teacher's files, e.g. fp16.")
    g.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")

    g = parser.add_argument_group("captions (no images are needed)")
    g.add_argument("--caption_file", default=None, help="A .txt file (one caption per line) or .csv/.jsonl/.json/.parquet with --caption_column. Lines that are not UTF-8 are skipped and counted.")
    g.add_argument("--dataset_name", default=None, help="A `datasets` dataset (Hub id or local folder) holding captions.")
    g.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    g.add_argument("--caption_column", default=None, help="Column with the captions (tables and datasets).")
    g.add_argument("--clean_caption", action=argparse.BooleanOptionalAction, default=True, help="Clean captions as PixArt-alpha does (same default as the pipeline, so training and inference agree).")
    g.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens per caption; default: the teacher family's (PixArt-alpha 120, PixArt-Σ 300).")
    g.add_argument("--text_embedding_cache", default=None, metavar="DIR", help="Encode every caption once with T5 into safetensors shards in DIR, then train without T5 in memory. Reused when it matches.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Accepted for compatibility with diffusers scripts; captions stream from memory, so no worker processes are used.")

    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default="sim-pixart", help="Where the pipeline, checkpoints, logs and model card go.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the caption order, noise and timesteps (per sample, so independent of the number of processes).")
    g.add_argument("--resolution", type=int, default=None, help="Training resolution; must match the teacher (512 or 1024); default: the teacher's.")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4, help="Samples per device per micro-step.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimiser step.")
    g.add_argument("--max_train_steps", type=int, default=10000, help="Optimiser steps in total; a resumed run may raise it to train longer.")
    g.add_argument("--learning_rate", type=float, default=5e-6, help="Generator learning rate.")
    g.add_argument("--fake_score_learning_rate", type=float, default=5e-5, help="Fake-score learning rate (higher than the generator's: F must track the generator).")
    g.add_argument("--adam_beta1", type=float, default=0.0, help="Adam beta1 of both networks (0, as SiD: momentum on a moving target hurts).")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2 of both networks.")
    g.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping of both networks (<= 0 disables).")
    g.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate schedule.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    g.add_argument("--max_consecutive_nonfinite_steps", type=int, default=10, help="Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).")

    g = parser.add_argument_group("SIM objective")
    g.add_argument("--divergence", default="sim", help="Generator objective: sim (pseudo-Huber, the paper's), sim_l2, sid, dmd.")
    g.add_argument("--guidance_scale", type=float, default=4.5, help="Classifier-free guidance of the teacher inside the loss (PixArt's default 4.5).")
    g.add_argument("--conditioning_timestep", type=int, default=None, help="t* of the one-step generator; default: VE sigma 2.5 (t = 440). Fixed for the model's life.")
    g.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c in score units; default scales with sqrt(latent elements) (sim_diffusers.losses).")
    g.add_argument("--sid_alpha", type=float, default=None, help="alpha of --divergence sid (default: sim_diffusers.losses).")
    g.add_argument("--loss_weighting", default="sigma2", help="w(t) of the generator loss: sigma2, uniform, ... (sim_diffusers.losses).")
    g.add_argument("--min_timestep", type=int, default=20, help="Smallest t of both updates.")
    g.add_argument("--max_timestep", type=int, default=979, help="Largest t of both updates.")
    g.add_argument("--regression_loss_weight", type=float, default=1.0, help="Weight of the teacher-ODE regression term (DMD's) in the generator loss: it keeps every mode of each caption (plain SIM collapses to one; docs/ground_truth.md). 0 disables it.")
    g.add_argument("--regression_every", type=int, default=4, help="One sample in N (by global sample index) also gets a regression target: the teacher's ODE from the generator's own noise.")
    g.add_argument("--regression_num_inference_steps", type=int, default=8, help="DPM-Solver++ steps of the teacher for each regression target (2 forwards each with guidance, no backward).")
    g.add_argument("--regression_distance", default="l2", choices=["l2", "pseudo_huber"], help="Distance of the regression term next to the divergence: l2 (mean squared error, DMD's; its pull grows with the error, which is what holds every mode against SIM's drive) or pseudo_huber.")
    g.add_argument("--regression_warmup_distance", default="pseudo_huber", choices=["pseudo_huber", "l2"], help="Distance of the regression term during the warm-up: pseudo_huber (the mean squared error for small errors, linear beyond c, so a blend of two modes is not favoured over committing to one; sharper and faster than l2 in docs/ground_truth.md) or l2.")
    g.add_argument("--regression_huber_c", type=float, default=None, help="c of the pseudo_huber regression distance, in latent units (default: 0.03 sqrt(latent elements), as --huber_c).")
    g.add_argument("--regression_warmup_steps", type=int, default=None, help=f"First N steps: the generator learns from the regression term alone, on every sample (no divergence), at --regression_warmup_learning_rate; the fake score trains as usual, so it is current when the divergence starts. Default: {DEFAULT_REGRESSION_WARMUP_STEPS} with the regression term on, 0 with it off.")
    g.add_argument("--regression_warmup_learning_rate", type=float, default=None, help="Generator learning rate during the regression warm-up (default: 10x --learning_rate).")
    g.add_argument("--regression_warmup_adam_beta1", type=float, default=0.9, help="Adam beta1 of the generator during the regression warm-up; --adam_beta1 again after it. A plain regression has a fixed target, so momentum helps it where SIM's moving target does not (docs/ground_truth.md).")
    g.add_argument("--fake_score_lora_rank", type=int, default=0, help="0: F is a full copy of the teacher. >0: F is a LoRA of this rank on the frozen teacher (peft), saving a model copy and its Adam states.")
    g.add_argument("--fake_score_lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator; it is what gets saved.")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay.")

    g = parser.add_argument_group("precision and memory")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Default: Accelerate's config. bf16 recommended on CUDA; trainable weights stay fp32.")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Checkpoint activations of G, F and (in the generator step) the teacher.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention instead of PyTorch SDPA.")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or `latest` (starts fresh when there is none).")

    g = parser.add_argument_group("validation")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="Prompts rendered every --validation_steps from the live generator.")
    g.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (and at the end).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt (fixed seeds).")

    g = parser.add_argument_group("logging and Hub")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", default="logs", help="Tracker directory, relative to --output_dir.")
    g.add_argument("--tracker_project_name", default="sim-pixart", help="Project name of the trackers.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload output_dir (without checkpoints) to the Hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Repo id for --push_to_hub (default: output_dir's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the stored login). Never logged or saved.")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    g.add_argument("--dry_run", action="store_true", help="Validate arguments and inputs, print the resolved configuration, and exit.")

    args = parser.parse_args(input_args)
    if args.regression_warmup_steps is None:
        args.regression_warmup_steps = DEFAULT_REGRESSION_WARMUP_STEPS if args.regression_loss_weight > 0 else 0
    return args


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

        print(json.dumps({**public_arguments(vars(args)), "num_captions": len(caption_set.captions), "resume": str(resume_path), **teacher_facts}, indent=2))
        return 0
    try:
        return train(args, caption_set, teacher_facts, resume_path)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def train(args, caption_set, teacher_facts, resume_path):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from sim_diffusers import SIMOneStepPipeline, sampling
    from sim_diffusers.generator import micro_conditions, one_step_generate
    from sim_diffusers.losses import get_divergence, is_finite
    from sim_diffusers.teachers import load_teacher_pipeline
    from sim_diffusers.training import checkpointing, faults
    from sim_diffusers.training.captions import CaptionStream
    from sim_diffusers.training.hub import public_arguments
    from sim_diffusers.training.models import ScoreNetworks, cast_trainable_to_fp32
    from sim_diffusers.training.run import (
        TrainingState,
        build_optimizer,
        copy_teacher_text_encoder,
        load_text_conditioning,
        log_validation,
        needs_text_encoder,
        register_checkpoint_hooks,
        validation_embeddings,
    )
    from sim_diffusers.training.step import (
        Conditioning, fake_score_update_loss, generator_update_loss, regression_term, teacher_ode_targets,
    )

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=multi_process_without_accelerator(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.clear_temporary(output_dir)  # leftovers of a save interrupted by a crash
        (output_dir / "training_args.json").write_text(json.dumps(public_arguments(vars(args)), indent=2))
    accelerator.wait_for_everyone()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # 1. Teacher T (frozen, weight dtype), generator G and fake score F (fp32 master weights)
    load_kwargs = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    teacher_pipe = load_teacher_pipeline(
        args.pretrained_model_name_or_path, dtype=weight_dtype, **load_kwargs,
        **({} if needs_text_encoder(args) else {"text_encoder": None}),
    )
    one_step = SIMOneStepPipeline.from_teacher(teacher_pipe, conditioning_timestep=args.conditioning_timestep, max_sequence_length=args.max_sequence_length)
    t_star = one_step.conditioning_timestep
    alphas_cumprod = one_step.scheduler.alphas_cumprod.to(device)
    generator = cast_trainable_to_fp32(one_step.transformer.requires_grad_(True)).train()
    networks = ScoreNetworks.build(teacher_pipe.transformer, args.fake_score_lora_rank, args.fake_score_lora_alpha)
    vae = teacher_pipe.vae.requires_grad_(False).eval()
    for module in (generator, networks.teacher, networks.fake_score, vae):
        module.to(device)
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        networks.enable_gradient_checkpointing()  # the generator step backpropagates through teacher and F
    if args.enable_xformers_memory_efficient_attention:
        for module in {id(m): m for m in (generator, networks.teacher, networks.fake_score)}.values():
            module.enable_xformers_memory_efficient_attention()

    # 2. Text conditioning: T5 online, or a safetensors cache built once (then T5 leaves memory)
    text = load_text_conditioning(args, accelerator, teacher_pipe, caption_set.captions, weight_dtype)
    negative = text.negative()
    validation = validation_embeddings(args, text)
    if args.text_embedding_cache is not None:
        teacher_pipe.text_encoder = None  # every embedding is cached: T5 leaves memory for the whole run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    latent_side = teacher_facts["native_resolution"] // one_step.vae_scale_factor
    latent_shape = (generator.config.in_channels, latent_side, latent_side)

    # 3. Optimisers and schedules of both networks, prepared for distribution
    opt_g = build_optimizer(args, generator.parameters(), args.learning_rate)
    opt_f = build_optimizer(args, networks.fake_score_parameters(), args.fake_score_learning_rate)
    sched_kwargs = dict(num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes, num_training_steps=args.max_train_steps * accelerator.num_processes)
    sched_g = get_scheduler(args.lr_scheduler, optimizer=opt_g, **sched_kwargs)
    sched_f = get_scheduler(args.lr_scheduler, optimizer=opt_f, **sched_kwargs)
    generator_ddp, fake_ddp, opt_g, opt_f, sched_g, sched_f = accelerator.prepare(
        generator, networks.fake_score, opt_g, opt_f, sched_g, sched_f
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=type(generator), model_config=generator.config, foreach=True)
        ema.to(device)
    state = TrainingState()
    register_checkpoint_hooks(accelerator, generator, networks, ema, state)

    # 4. Resume: weights, optimisers, schedules, RNG and the caption-stream position (= the step)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        state.load(resume_path)
    divergence = get_divergence(args.divergence)
    regression_warmup_lr = args.regression_warmup_learning_rate or 10.0 * args.learning_rate
    options = {}
    if args.divergence == "sim" and args.huber_c is not None:
        options["huber_c"] = args.huber_c
    if args.divergence == "sid" and args.sid_alpha is not None:
        options["sid_alpha"] = args.sid_alpha
    accum = args.gradient_accumulation_steps
    ode_scheduler = sampling.ode_scheduler(teacher_pipe.scheduler)
    stream = CaptionStream(caption_set.captions, args.seed, args.train_batch_size * accelerator.num_processes * accum, args.min_timestep, args.max_timestep)
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in public_arguments(vars(args)).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    fault_plan = faults.from_environment()

    def conditioning_for(captions, batch_size):
        embeds, mask = text(captions)
        return Conditioning(
            embeds.to(device), mask.to(device),
            negative[0].expand(batch_size, -1, -1).to(device), negative[1].expand(batch_size, -1).to(device),
            micro_conditions(generator, batch_size, teacher_facts["native_resolution"], teacher_facts["native_resolution"], device, weight_dtype),
        )

    def generate(z, cond, with_graph):
        with torch.set_grad_enabled(with_graph):
            return one_step_generate(generator_ddp, z, t_star, alphas_cumprod, cond.prompt_embeds, cond.prompt_attention_mask, cond.added_cond_kwargs)

    def apply_update(name, loss_values, optimizer, scheduler, parameters):
        """Clip, check for NaN/Inf (loss and synchronised gradients) and step; a bad update is skipped and counted."""
        if args.max_grad_norm > 0:
            # The total norm is non-finite iff some gradient is: one reduction serves clipping and the NaN guard.
            grad_norm = accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
            finite = is_finite(torch.stack(loss_values), grad_norm)
        else:
            grad_norm = None
            finite = is_finite(torch.stack(loss_values), *[p.grad for p in parameters if p.grad is not None])
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.record(name, finite)
        return grad_norm, finite

    progress = tqdm(range(args.max_train_steps), initial=state.step, desc="SIM steps", disable=not accelerator.is_local_main_process)
    samples_per_step = stream.global_batch_size
    tic = time.perf_counter()
    g_params = list(generator_ddp.parameters())
    f_params = [p for p in fake_ddp.parameters() if p.requires_grad]

    # 5. Training loop
    while state.step < args.max_train_steps:
        step = state.step
        with accelerator.autocast():
            # 5a. Samples of this step (per-sample randomness from (seed, position): independent of the world size)
            micro = []
            for m in range(accum):
                captions, rnd = stream.batch(step, m, args.train_batch_size, accelerator.process_index, accelerator.num_processes, latent_shape)
                micro.append((conditioning_for(captions, len(captions)), rnd.to(device)))

            # 5b. Fake-score update on detached generator samples
            x0_shared, f_losses = None, []
            for m, (cond, rnd) in enumerate(micro):
                with _no_sync_unless(accelerator, fake_ddp, last=m == accum - 1):
                    x0 = generate(rnd.noise, cond, with_graph=accum == 1)  # kept for the generator update when accum == 1
                    loss_f = fake_score_update_loss(networks, fake_ddp, x0, rnd.fake_timesteps, rnd.fake_noise, cond, alphas_cumprod)
                    accelerator.backward(loss_f / accum)
                    f_losses.append(loss_f.detach())
                    x0_shared = x0 if accum == 1 else None
            f_norm, _ = apply_update("fake_score", f_losses, opt_f, sched_f, f_params)

            # 5c. Generator update through the guided teacher and the (frozen) fake score; during the regression
            # warm-up, the regression term alone on every sample
            warming_up = step < args.regression_warmup_steps
            # Set every step: the schedule's value (computed from the base rates, so untouched by the warm-up) is
            # restored even when the last warm-up update was skipped and the scheduler did not step.
            for group, scheduled in zip(opt_g.param_groups, sched_g.get_last_lr()):
                group["lr"] = regression_warmup_lr if warming_up else scheduled
                group["betas"] = (args.regression_warmup_adam_beta1 if warming_up else args.adam_beta1, args.adam_beta2)
            lr_g = opt_g.param_groups[0]["lr"]
            every = 1 if warming_up else args.regression_every
            distance = args.regression_warmup_distance if warming_up else args.regression_distance
            g_losses, gaps, regs = [], [], []
            for m, (cond, rnd) in enumerate(micro):
                with _no_sync_unless(accelerator, generator_ddp, last=m == accum - 1):
                    x0 = x0_shared if x0_shared is not None else generate(rnd.noise, cond, with_graph=True)
                    if warming_up:
                        loss_g = x0.sum() * 0.0
                    else:
                        loss_g, stats = generator_update_loss(
                            networks, x0, rnd.generator_timesteps, rnd.generator_noise, cond, alphas_cumprod,
                            divergence, args.guidance_scale, args.loss_weighting, options,
                        )
                        gaps.append(stats["eps_gap"])
                    if args.regression_loss_weight > 0:
                        positions = stream.local_positions(step, m, args.train_batch_size, accelerator.process_index, accelerator.num_processes)
                        index = torch.tensor([i for i, p in enumerate(positions) if p % every == 0], dtype=torch.long, device=device)
                        targets = None
                        if len(index):
                            targets = teacher_ode_targets(networks, ode_scheduler, rnd.noise[index], cond.select(index), args.guidance_scale, args.regression_num_inference_steps)
                        loss_reg = regression_term(x0, targets, index, args.train_batch_size / every, distance, args.regression_huber_c)
                        regs.append(loss_reg.detach())
                        loss_g = loss_g + (1.0 if warming_up else args.regression_loss_weight) * loss_reg
                    loss_g = fault_plan.maybe_corrupt("generator_loss", step, loss_g)
                    accelerator.backward(loss_g / accum)
                    g_losses.append(loss_g.detach())
            fault_plan.maybe_kill("step", step)
            g_norm, g_ok = apply_update("generator", g_losses, opt_g, sched_g, g_params)
        if ema is not None and g_ok:
            ema.step(generator.parameters())

        state.advance()
        progress.update(1)
        elapsed = time.perf_counter() - tic
        logs = {
            "loss/generator": torch.stack(g_losses).mean().item(),
            "loss/fake_score": torch.stack(f_losses).mean().item(),
            **({"eps_gap_teacher_fake": torch.stack(gaps).mean().item()} if gaps else {}),
            **({"loss/regression": torch.stack(regs).mean().item()} if regs else {}),
            "regression_warmup": int(warming_up),
            "lr/generator": lr_g,
            "lr/fake_score": sched_f.get_last_lr()[0],
            "nonfinite_skipped/generator": state.skipped["generator"],
            "nonfinite_skipped/fake_score": state.skipped["fake_score"],
        }
        for key, norm in (("grad_norm/generator", g_norm), ("grad_norm/fake_score", f_norm)):
            if norm is not None:
                logs[key] = float(norm)
        accelerator.log(logs, step=state.step)
        progress.set_postfix(g=f"{logs['loss/generator']:.3g}", f=f"{logs['loss/fake_score']:.3g}", samples_s=f"{samples_per_step * progress.n / max(elapsed, 1e-9):.1f}" if progress.n else "-")

        if state.consecutive_bad >= args.max_consecutive_nonfinite_steps:
            last = checkpointing.latest_checkpoint(output_dir)
            message = (
                f"error: {state.consecutive_bad} consecutive non-finite steps, the last at step {step}; stopping. "
                f"Last good checkpoint: {last if last else 'none'}."
            )
            if accelerator.is_main_process:
                print(message, file=sys.stderr)
            accelerator.end_training()
            return 3
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            save_checkpoint(accelerator, args, output_dir, state, fault_plan)
        if args.validation_prompts and (state.step % args.validation_steps == 0 or state.step == args.max_train_steps):
            log_validation(accelerator, args, one_step, generator, ema, validation, state.step, weight_dtype)

    # 6. Save the one-step pipeline (EMA weights when --use_ema), the model card, and push
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(generator_ddp)
        if ema is not None:
            final = type(final).from_config(final.config)
            ema.copy_to(final.parameters())
        pipe = SIMOneStepPipeline(
            tokenizer=teacher_pipe.tokenizer, text_encoder=None, vae=vae, transformer=final.float(),
            scheduler=one_step.scheduler, conditioning_timestep=t_star, max_sequence_length=args.max_sequence_length,
        )
        vae_dtype = vae.dtype
        vae.float()  # saved at full precision, as the teacher ships it
        save_final_pipeline(args, pipe, output_dir, checkpointing, copy_teacher_text_encoder, fault_plan)
        vae.to(vae_dtype)
        write_model_card(args, output_dir, t_star, state.step, teacher_facts["teacher_family"])
        if args.push_to_hub:
            push(args, output_dir)
    accelerator.end_training()
    return 0


def multi_process_without_accelerator() -> bool:
    """`accelerate launch --multi_gpu` on a machine without GPUs: Accelerate needs cpu=True to form a gloo group
    (otherwise every process silently trains alone)."""
    import torch
    from accelerate.utils import is_npu_available, is_xpu_available

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return distributed and not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


def _no_sync_unless(accelerator, model, last: bool):
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


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


def save_final_pipeline(args, pipe, output_dir, checkpointing, copy_teacher_text_encoder, fault_plan):
    """The pipeline is written once into a temporary folder, completed there with the teacher's T5 files, and only
    then published (atomically) into output_dir."""

    def add_teacher_text_encoder(folder):
        copy_teacher_text_encoder(args, folder)
        fault_plan.maybe_kill("final_save", 0)

    checkpointing.save_pipeline_atomically(pipe, output_dir, finalize=add_teacher_text_encoder)


def write_model_card(args, output_dir, t_star, steps, teacher_family):
    from sim_diffusers.training.hub import render_model_card

    grid = output_dir / "validation" / "latest.png"
    render_model_card(
        MODEL_CARD_TEMPLATE,
        output_dir,
        # A local teacher folder has no Hub id to link; the card then names no base_model.
        base_model=None if Path(args.pretrained_model_name_or_path).exists() else args.pretrained_model_name_or_path,
        repo_id=args.hub_model_id,
        conditioning_timestep=t_star,
        teacher_family=teacher_family,
        settings={**vars(args), "trained_steps": steps},
        validation_image="validation/latest.png" if grid.exists() else None,
        validation_prompts=args.validation_prompts,
        use_ema=args.use_ema,
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
