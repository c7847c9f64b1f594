"""How well can the one-step network learn the teacher's ODE map by regression alone?

    python -m research.fit_ode_map --num_pairs 2048 --steps 3000

A diagnostic for the regression term of the trainer: it draws `--num_pairs` noises per caption once, solves the
teacher's ODE from each (DPM-Solver++, `--num_inference_steps`, guidance 1), and fits the one-step generator
(initialised from the teacher at t*) to those pairs by regression only (`--distance`: mean squared error, or
pseudo-Huber as the trainer's default), with no divergence and no fake score.
It scores the generator on held-out noise (the same noise as benchmarks.ground_truth.distill and research.screen)
every --eval_every steps and appends one JSON line to --out. If this fit stays blurry, the anchor alone cannot make
samples sharp at this size; if it becomes sharp, the limit of SIM + regression lies in how the two terms interact,
not in the network.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from research._common import (
    EVALUATION_SEED,
    add_extra_layers_arg,
    add_world_and_teacher_args,
    append_record,
    deepen,
    evaluating,
    load_teacher_setup,
    mean_squared_error,
    sample_and_score,
    save_weights,
)
from sim_diffusers.generator import one_step_generate
from sim_diffusers.ground_truth import (
    default_cache_dir,
    evaluate_pipeline_latents,
    sample_teacher_latents,
    teacher_cache_key,
)
from sim_diffusers.losses import regression_loss
from sim_diffusers.sampling import teacher_ode_sample

REPO = Path(__file__).resolve().parents[1]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_teacher_args(parser)
    parser.add_argument("--name", default="fit")
    parser.add_argument(
        "--num_pairs", type=int, default=2048, help="Training pairs per caption (0: fresh pairs each step)."
    )
    parser.add_argument("--num_inference_steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption at each evaluation.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--distance", choices=("l2", "pseudo_huber"), default="l2", help="See losses.regression_loss.")
    parser.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (norm units); default as for SIM.")
    parser.add_argument("--conditioning_timestep", type=int, default=None, help="t*; default VE sigma 2.5 (t = 440).")
    add_extra_layers_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="Save the fitted generator's weights here (safetensors).")
    parser.add_argument("--out", default=str(REPO / "outputs" / "ground_truth" / "fit_ode_map.jsonl"))
    return parser.parse_args(input_args)


def main(args):
    world, config, teacher_pipe, (embeds, mask, empty_embeds, empty_mask), one_step = load_teacher_setup(args)
    teacher = teacher_pipe.transformer.requires_grad_(False)
    alphas_cumprod = teacher_pipe.scheduler.alphas_cumprod
    t_star = one_step.conditioning_timestep
    rng = torch.Generator().manual_seed(args.seed)
    shape = world.latent_shape

    def ode_targets(z, idx):
        return teacher_ode_sample(
            teacher,
            teacher_pipe.scheduler,
            z,
            embeds[idx],
            mask[idx],
            empty_embeds.expand(len(idx), -1, -1),
            empty_mask.expand(len(idx), -1),
            1.0,
            args.num_inference_steps,
        )

    start = time.time()
    pool = None
    if args.num_pairs > 0:
        from safetensors.torch import load_file, save_file

        cache = Path(args.cache_dir or default_cache_dir()) / (
            f"ode_pairs_{teacher_cache_key(world, config)}_{args.num_pairs}"
            f"_{args.num_inference_steps}_{args.seed}.safetensors"
        )
        if cache.exists():
            pool = tuple(load_file(cache)[k] for k in ("index", "noise", "target"))
        else:
            idx = torch.arange(world.num_captions).repeat_interleave(args.num_pairs)
            z = torch.randn((len(idx), *shape), generator=torch.Generator().manual_seed(args.seed + 1))
            targets = torch.cat([ode_targets(z[i : i + 512], idx[i : i + 512]) for i in range(0, len(idx), 512)])
            pool = (idx, z, targets)
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"index": idx, "noise": z.contiguous(), "target": targets.contiguous()}, cache)
        print(f"{len(pool[0])} pairs in {time.time() - start:.0f}s", flush=True)

    generator = deepen(copy.deepcopy(teacher), args.extra_layers).train().requires_grad_(True)
    opt = torch.optim.AdamW(generator.parameters(), lr=args.lr, betas=(args.adam_beta1, 0.999), weight_decay=0.0)

    # The teacher's ODE solutions from the evaluation noise: the held-out regression error.
    held_out = sample_teacher_latents(
        teacher_pipe, world, args.num_samples, args.num_inference_steps, seed=EVALUATION_SEED
    )

    def on_training_noise():
        # The same metrics on the first --num_samples training noises of each caption: a gap to the held-out scores
        # would mean the fit memorises its pairs rather than failing to represent the map.
        n = min(args.num_samples, args.num_pairs)
        rows = [slice(c * args.num_pairs, c * args.num_pairs + n) for c in range(world.num_captions)]
        with evaluating(generator):
            samples = [
                one_step_generate(generator, pool[1][r], t_star, alphas_cumprod, embeds[pool[0][r]], mask[pool[0][r]])
                for r in rows
            ]
        metrics = evaluate_pipeline_latents(world, samples)["mean"]
        mse = mean_squared_error(samples, [pool[2][r] for r in rows])
        return {"fidelity": round(metrics["fidelity"], 4), "mmd": round(metrics["mmd"], 4), "mse": round(mse, 5)}

    def evaluate(step):
        samples, metrics = sample_and_score(one_step, generator, world, args.num_samples)
        mse = mean_squared_error(samples, held_out)
        row = {"step": step, **metrics, "held_out_mse": round(mse, 5)}
        if pool is not None:
            row["on_training_noise"] = on_training_noise()
        print(args.name, row, f"{time.time() - start:.0f}s", flush=True)
        return row

    curve = [evaluate(0)]
    for step in range(1, args.steps + 1):
        if pool is not None:
            pick = torch.randint(0, len(pool[0]), (args.train_batch_size,), generator=rng)
            idx, z, target = pool[0][pick], pool[1][pick], pool[2][pick]
        else:
            idx = torch.randint(0, world.num_captions, (args.train_batch_size,), generator=rng)
            z = torch.randn((args.train_batch_size, *shape), generator=rng)
            target = ode_targets(z, idx)
        x0 = one_step_generate(generator, z, t_star, alphas_cumprod, embeds[idx], mask[idx])
        loss = regression_loss(x0, target, args.distance, args.huber_c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.eval_every == 0:
            curve.append({**evaluate(step), "train_mse": round(loss.item(), 5)})
    if args.save:
        save_weights(generator, args.save)
    append_record(args, curve, start)


if __name__ == "__main__":
    main(parse_args())
