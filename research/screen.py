"""Fast in-process screening of SIM settings on the ground-truth teacher (no accelerate launch, no checkpoints).

    python -m research.screen --name plain --steps 300
    python -m research.screen --name regression --steps 400 --regression_weight 1

The same package functions as the trainer (`one_step_generate`, `ScoreNetworks`, `fake_score_update_loss`,
`generator_update_loss`, `teacher_ode_targets`' sampler) on captions drawn uniformly, with one torch RNG for the whole run
(so runs with the same seed share their first steps exactly). It scores the live generator every --eval_every steps
(256 samples per caption, the same noise as benchmarks.ground_truth.distill) and appends one JSON line per run to
--out. It exists to try many settings in minutes; `benchmarks.ground_truth.distill` (the real trainer through
`accelerate launch`, reloaded with `from_pretrained`) is the benchmark whose numbers the defaults rest on.
research/NOTEBOOK.md lists what was screened.
"""

from __future__ import annotations

import argparse
import copy
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
    tolerant_regression_loss,
)
from sim_diffusers.generator import guided_eps, one_step_generate, predict_eps
from sim_diffusers.losses import get_divergence, regression_loss
from sim_diffusers.sampling import dpm_solver_sample
from sim_diffusers.schedule import diffuse
from sim_diffusers.training.models import ScoreNetworks
from sim_diffusers.training.step import Conditioning, fake_score_update_loss, generator_update_loss

REPO = Path(__file__).resolve().parents[1]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_teacher_args(parser)
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption at each evaluation.")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr_generator", type=float, default=1e-4)
    parser.add_argument("--lr_fake", type=float, default=1e-4)
    parser.add_argument("--adam_beta1", type=float, default=0.0)
    parser.add_argument("--fake_steps", type=int, default=1, help="Fake-score updates per generator update.")
    parser.add_argument("--fake_warmup_steps", type=int, default=0, help="Fake-score updates before the first generator update.")
    parser.add_argument("--divergence", default="sim")
    parser.add_argument("--huber_c", type=float, default=None)
    parser.add_argument("--loss_weighting", default="sigma2")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--conditioning_timestep", type=int, default=None, help="t*; default VE sigma 2.5 (t = 440).")
    parser.add_argument("--min_timestep", type=int, default=20)
    parser.add_argument("--max_timestep", type=int, default=979)
    parser.add_argument("--no_divergence", action="store_true", help="Regression term only (the divergence is zeroed).")
    parser.add_argument("--regression_weight", type=float, default=0.0)
    parser.add_argument("--regression_batch_size", type=int, default=8, help="Extra samples per step with a teacher-ODE target.")
    parser.add_argument("--regression_num_inference_steps", type=int, default=8)
    parser.add_argument("--regression_distance", choices=("l2", "pseudo_huber"), default="l2", help="See losses.regression_loss.")
    parser.add_argument("--regression_huber_c", type=float, default=None)
    parser.add_argument("--regression_tolerance", type=float, default=0.0,
                        help="Samples within this distance (latent norm) of their target are not pulled; see "
                        "losses.regression_loss.")
    parser.add_argument("--regression_coupling", choices=("same_noise", "batch_ot"), default="same_noise",
                        help="same_noise: each sample regresses onto the teacher's ODE solution from its own noise. "
                        "batch_ot: the regression samples of a step share one caption, and each regresses onto the "
                        "teacher solution the optimal assignment (squared distance) within the step gives it: the "
                        "set of samples must match the teacher's, not the teacher's map of noise to modes.")
    parser.add_argument("--regression_until", type=int, default=None, help="Drop the regression term after this step.")
    parser.add_argument("--regression_space", choices=("x0", "denoised"), default="x0",
                        help="x0: MSE of samples; denoised: MSE of the teacher's x0 predictions of both, diffused to "
                        "t in [--regression_t_low, --regression_t_high] with shared noise.")
    parser.add_argument("--regression_t_low", type=int, default=500)
    parser.add_argument("--regression_t_high", type=int, default=800)
    parser.add_argument("--gan_weight", type=float, default=0.0,
                        help="Adversarial term on the regression samples: a per-token head on the frozen teacher's "
                        "last-block features tells the teacher's ODE solutions (real) from the generator's samples "
                        "from the same noise (fake), both diffused to t in [--gan_t_low, --gan_t_high]; the "
                        "generator's loss adds gan_weight x the non-saturating loss. Needs --regression_weight > 0.")
    parser.add_argument("--gan_t_low", type=int, default=20)
    parser.add_argument("--gan_t_high", type=int, default=700)
    parser.add_argument("--lr_discriminator", type=float, default=1e-4)
    parser.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant", help="Of both networks.")
    parser.add_argument("--ema_decay", type=float, default=None, help="Also score an EMA of the generator's weights.")
    add_extra_layers_arg(parser)
    parser.add_argument("--init_generator", default=None, help="Start the generator from these weights (safetensors), "
                        "e.g. fit_ode_map.py --save.")
    parser.add_argument("--save", default=None, help="Save the final generator's weights here (safetensors).")
    parser.add_argument("--out", default=str(REPO / "outputs" / "ground_truth" / "screen.jsonl"))
    args = parser.parse_args(input_args)
    if args.gan_weight > 0 and (args.regression_weight <= 0 or args.regression_space != "x0"):
        parser.error("--gan_weight acts on the regression samples: it needs --regression_weight > 0 and "
                     "--regression_space x0")
    if args.regression_tolerance < 0 or (args.regression_tolerance > 0 and (
            args.regression_weight <= 0 or args.regression_space != "x0")):
        parser.error("--regression_tolerance must be >= 0, and acts on the x0 regression: it needs "
                     "--regression_weight > 0 and --regression_space x0")
    return args


def main(args):
    world, _, teacher_pipe, (embeds, mask, empty_embeds, empty_mask), one_step = load_teacher_setup(args)
    alphas_cumprod = teacher_pipe.scheduler.alphas_cumprod
    t_star = one_step.conditioning_timestep
    teacher = teacher_pipe.transformer
    generator = deepen(copy.deepcopy(teacher), args.extra_layers).train().requires_grad_(True)
    if args.init_generator:
        load_weights(generator, args.init_generator)
    networks = ScoreNetworks.build(copy.deepcopy(teacher))
    betas = (args.adam_beta1, 0.999)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=args.lr_generator, betas=betas, weight_decay=0.0)
    opt_f = torch.optim.AdamW(networks.fake_score_parameters(), lr=args.lr_fake, betas=betas, weight_decay=0.0)
    schedulers = []
    if args.lr_schedule == "cosine":
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps) for opt in (opt_g, opt_f)]
    divergence = get_divergence(args.divergence)
    options = {"huber_c": args.huber_c} if args.huber_c is not None else {}
    rng = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    shape, batch = world.latent_shape, args.train_batch_size

    def draw_conditioning(size, one_caption=False):
        idx = torch.randint(0, world.num_captions, (batch,), generator=rng)[:size]
        if one_caption:
            idx = idx[:1].expand(size)
        return Conditioning(embeds[idx], mask[idx], empty_embeds.expand(size, -1, -1), empty_mask.expand(size, -1))

    def draw_timesteps(size=batch, low=args.min_timestep, high=args.max_timestep):
        return torch.randint(low, high + 1, (size,), generator=rng)

    def generate(z, cond):
        return one_step_generate(generator, z, t_star, alphas_cumprod, cond.prompt_embeds, cond.prompt_attention_mask)

    def fake_score_step():
        cond = draw_conditioning(batch)
        z = torch.randn((batch, *shape), generator=rng)
        with torch.no_grad():
            x0 = generate(z, cond)
        loss = fake_score_update_loss(networks, networks.fake_score, x0, draw_timesteps(), torch.randn(x0.shape, generator=rng), cond, alphas_cumprod)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(networks.fake_score_parameters(), 1.0)
        opt_f.step()
        opt_f.zero_grad()

    def teacher_eps(cond, grad):
        def eps_fn(x_t, t):
            with torch.set_grad_enabled(grad):
                return guided_eps(networks.teacher, x_t, t, *cond.cond, *cond.uncond, args.guidance_scale)
        return eps_fn

    def regression(cond, size):
        """(regression loss, adversarial loss of the same samples: 0 without --gan_weight)."""
        z = torch.randn((size, *shape), generator=rng)
        with torch.no_grad():
            target = dpm_solver_sample(teacher_eps(cond, False), teacher_pipe.scheduler, z, args.regression_num_inference_steps)
        x0 = generate(z, cond)
        if args.regression_coupling == "batch_ot":
            from scipy.optimize import linear_sum_assignment

            cost = torch.cdist(x0.detach().flatten(1), target.flatten(1)).square()
            target = target[torch.as_tensor(linear_sum_assignment(cost.numpy())[1])]
        if args.regression_space == "x0":
            loss = tolerant_regression_loss(x0, target, args.regression_distance, args.regression_huber_c,
                                            args.regression_tolerance).mean()
            return loss, (adversarial(x0, target, cond) if args.gan_weight > 0 else 0.0)
        t = draw_timesteps(size, args.regression_t_low, args.regression_t_high)
        alpha, sigma = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=rng)

        def denoised(x, grad):
            x_t = alpha * x + sigma * noise
            return (x_t - sigma * teacher_eps(cond, grad)(x_t, t)) / alpha

        return regression_loss(denoised(x0, True), denoised(target, False).detach(), args.regression_distance,
                               args.regression_huber_c).mean(), 0.0

    ema = copy.deepcopy(generator).requires_grad_(False) if args.ema_decay is not None else None

    # The adversarial term (--gan_weight): LADD-style, a trainable head on the frozen teacher's features.
    features, gan_log = {}, []
    if args.gan_weight > 0:
        networks.teacher.transformer_blocks[-1].register_forward_hook(
            lambda module, inputs, output: features.update(last=output))
        width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                   torch.nn.Linear(width, 1))
        opt_d = torch.optim.AdamW(head.parameters(), lr=args.lr_discriminator, betas=(0.0, 0.999), weight_decay=0.0)

    def discriminator_logits(x0, t, noise, cond):
        x_t, _, _ = diffuse(x0, t, noise, alphas_cumprod)
        with networks.teacher_mode():
            predict_eps(networks.teacher, x_t, t, *cond.cond)
        return head(features.pop("last")).squeeze(-1)  # (B, tokens): one logit per latent patch

    def adversarial(x0, target, cond):
        """One discriminator step on (target: real, x0: fake); returns the generator's non-saturating loss on x0."""
        t = draw_timesteps(len(x0), args.gan_t_low, args.gan_t_high)
        noise = torch.randn(x0.shape, generator=rng)
        d_loss = (torch.nn.functional.softplus(-discriminator_logits(target, t, noise, cond)).mean()
                  + torch.nn.functional.softplus(discriminator_logits(x0.detach(), t, noise, cond)).mean())
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad()
        head.requires_grad_(False)
        g_loss = torch.nn.functional.softplus(-discriminator_logits(x0, t, noise, cond)).mean()
        head.requires_grad_(True)
        gan_log.append((d_loss.item(), g_loss.item()))
        return g_loss

    def evaluate(step):
        row = {"step": step, **sample_and_score(one_step, generator, world, args.num_samples)[1]}
        if ema is not None:
            row["ema"] = sample_and_score(one_step, ema, world, args.num_samples)[1]
        if gan_log:  # the discriminator's and the generator's adversarial losses since the last evaluation
            row["gan_d_loss"], row["gan_g_loss"] = (round(sum(v) / len(v), 4) for v in zip(*gan_log))
            gan_log.clear()
        print(args.name, row, f"{time.time() - start:.0f}s", flush=True)
        return row

    start = time.time()
    curve = [evaluate(0)]
    for _ in range(args.fake_warmup_steps):
        fake_score_step()
    for step in range(1, args.steps + 1):
        for _ in range(args.fake_steps):
            fake_score_step()
        cond = draw_conditioning(batch)
        z = torch.randn((batch, *shape), generator=rng)
        x0 = generate(z, cond)
        loss, _ = generator_update_loss(networks, x0, draw_timesteps(), torch.randn(x0.shape, generator=rng), cond, alphas_cumprod, divergence, args.guidance_scale, args.loss_weighting, options)
        if args.no_divergence:
            loss = loss * 0
        if args.regression_weight > 0 and (args.regression_until is None or step <= args.regression_until):
            regression_term, adversarial_term = regression(
                draw_conditioning(args.regression_batch_size, args.regression_coupling == "batch_ot"),
                args.regression_batch_size)
            loss = loss + args.regression_weight * regression_term + args.gan_weight * adversarial_term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
        opt_g.step()
        opt_g.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        if ema is not None:
            with torch.no_grad():
                ema_params, live_params = list(ema.parameters()), list(generator.parameters())
                torch._foreach_lerp_(ema_params, live_params, 1.0 - args.ema_decay)
        if step % args.eval_every == 0:
            curve.append(evaluate(step))
    if args.save:
        save_weights(generator, args.save)
    append_record(args, curve, start)


if __name__ == "__main__":
    main(parse_args())
