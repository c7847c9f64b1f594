"""How sharply each sampler switches between modes, and how much boundary between modes it has.

A sampler of the world maps noise z ~ N(0, I) to latents; its prompt fidelity is the Gaussian measure of the noise it
sends onto a mode of the caption. Where the regions of noise sent to two different modes meet, the map either jumps
(a clean boundary) or passes through a band of noise that lands in between: misses. To first order the misses in
such bands weigh A x w, A the Gaussian surface measure of the boundary and w its mean band width (0 where clean).
Gaussian isoperimetry bounds A from below once the modes' weights are fixed (cutting noise into parts of measure
0.5 / 0.3 / 0.2 takes A >= 0.51 whatever the cut; two parallel cuts take 0.63-0.75), so at a given width the only way
to fewer misses is fewer boundaries, that is fewer modes. A band is as wide as the noise distance over which the map
carries its output from one mode to the other, so a map that stretches noise distances by at most L has w >= gap / L.

Two measurements, on the evaluation noise of every caption:
- lines: through each of the first --max_lines misses, along the direction in which the miss moves fastest from its
  nearest mode towards its second (the gradient of d_nearest^2 - d_second^2 over block-mean patterns, as in the
  metrics), the map's outputs at --spacing for --half_length each way, measured by `research.diagnostics.band_widths`;
- circles: --circles great circles z(theta) = cos(theta) z1 + sin(theta) z2 through pairs of the noise, every point
  of which is N(0, I), counted by `research.diagnostics.circle_crossings`; their crossings estimate A (Gaussian
  Crofton formula).

    python -m research.transitions outputs/ground_truth/fits/fit_lr3e-4_2000.safetensors \
        --untrained --teacher_steps 8 20

Line columns: fidelity; the share of lines whose band lies between two different modes, and of those still off-mode
at an end of the line (censored); the median band width and the mean width over the boundary (the harmonic mean over
misses, since a band is hit in proportion to its width); the median over lines of the largest local stretch (latent
distance over noise distance between neighbouring points: a lower bound on the map's local Lipschitz constant).
Circle columns: the off-mode share of circle points (1 - fidelity again, independently sampled); crossings per circle;
the boundary measure A they imply; the share of crossings that are clean; the share of circle points in bands
between two modes; the mean band width over the boundary that gives (band share / A).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from research import _common
from research._common import (
    EVALUATION_SEED,
    add_world_and_teacher_args,
    generator_path,
    load_generator,
    markdown_table,
)

LINE_COLUMNS = ("fidelity", "between_modes", "censored", "median_width", "mean_width", "median_max_slope")
CIRCLE_COLUMNS = (
    "circle_off_mode",
    "crossings_per_circle",
    "boundary_measure",
    "clean_crossings",
    "band_fraction",
    "boundary_mean_width",
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "generators",
        nargs="*",
        help="Generators: checkpoint, pipeline or transformer folders, or safetensors of screen.py / "
        "fit_ode_map.py --save.",
    )
    parser.add_argument(
        "--teacher_steps",
        type=int,
        nargs="*",
        default=[],
        help="Also the teacher with DPM-Solver++ at these steps (g = 1), differentiated through the solver.",
    )
    parser.add_argument("--untrained", action="store_true", help="Also the untrained one-step generator.")
    parser.add_argument("--num_samples", type=int, default=256, help="Evaluation samples per caption.")
    parser.add_argument(
        "--max_lines", type=int, default=64, help="Lines through at most this many misses per caption."
    )
    parser.add_argument(
        "--half_length", type=float, default=3.0, help="Each line runs this far (noise units) each way."
    )
    parser.add_argument("--spacing", type=float, default=0.05, help="Noise distance between points on a line.")
    parser.add_argument("--circles", type=int, default=8, help="Great circles of noise per caption (0: none).")
    parser.add_argument("--circle_points", type=int, default=512, help="Evenly spaced points on each circle.")
    parser.add_argument("--chunk", type=int, default=2048, help="Points per forward pass.")
    parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    parser.add_argument(
        "--generator_timesteps",
        type=int,
        nargs="+",
        default=None,
        help="The generators' K timesteps (default: a pipeline folder's own, else one step at t*). A K-step map is "
        "measured with the fresh noise of its calls 2 .. K fixed per caption.",
    )
    add_world_and_teacher_args(parser)
    args = parser.parse_args(input_args)
    if args.spacing <= 0 or args.half_length < args.spacing or args.max_lines < 1:
        parser.error("--spacing must be > 0, --half_length >= --spacing and --max_lines >= 1.")
    if args.circles < 0 or 2 * args.circles > args.num_samples or args.circle_points < 3:
        parser.error("--circles must be between 0 and --num_samples / 2 and --circle_points >= 3.")
    if any(steps < 1 for steps in args.teacher_steps):
        parser.error("--teacher_steps must be >= 1.")
    return args


def generator_timesteps_of(path: Path) -> list[int] | None:
    """The timesteps a pipeline folder saved (model_index.json next to its transformer), or None."""
    index = path.parent / "model_index.json"
    if path.name == "transformer" and index.is_file():
        return json.loads(index.read_text()).get("generator_timesteps")
    return None


def block_patterns(world, x: torch.Tensor) -> torch.Tensor:
    """`world.patterns`, differentiable."""
    return torch.nn.functional.avg_pool2d(x.float(), world.block_size).flatten(1)


def run_map(sample_map, points, chunk):
    with torch.no_grad():
        return torch.cat([sample_map(part) for part in points.split(chunk)])


def measure(world, caption_idx: int, sample_map, args) -> tuple[float, dict, dict | None]:
    """Fidelity of `sample_map` (noise (B, C, H, W) -> latents, differentiable) on the caption's evaluation noise,
    `band_widths` of lines through its first misses and `circle_crossings` of circles through pairs of that noise."""
    from research.diagnostics import band_widths, circle_crossings
    from sim_diffusers.ground_truth import initial_noise

    noise = initial_noise(world, args.num_samples, EVALUATION_SEED, caption_idx)
    mode_patterns = world.patterns(world.means[caption_idx])
    with torch.no_grad():
        distances = torch.cdist(block_patterns(world, sample_map(noise)), mode_patterns)
    misses = (distances.min(dim=1).values >= world.fidelity_radius).nonzero().flatten()
    fidelity = 1.0 - len(misses) / args.num_samples
    circles = None
    if args.circles:
        angles = torch.arange(args.circle_points) * (2 * torch.pi / args.circle_points)
        z1, z2 = noise[0 : 2 * args.circles : 2], noise[1 : 2 * args.circles : 2]
        points = angles.cos().view(1, -1, 1, 1, 1) * z1[:, None] + angles.sin().view(1, -1, 1, 1, 1) * z2[:, None]
        latents = run_map(sample_map, points.flatten(0, 1), args.chunk)
        circles = circle_crossings(world, caption_idx, latents.reshape(*points.shape[:2], *world.latent_shape))
    misses = misses[: args.max_lines]
    if len(misses) == 0:
        return fidelity, {}, circles
    nearest_two = distances[misses].argsort(dim=1)[:, :2]
    z = noise[misses].clone().requires_grad_(True)
    patterns = block_patterns(world, sample_map(z))
    to_nearest = (patterns - mode_patterns[nearest_two[:, 0]]).square().sum(dim=1)
    to_second = (patterns - mode_patterns[nearest_two[:, 1]]).square().sum(dim=1)
    (direction,) = torch.autograd.grad((to_nearest - to_second).sum(), z)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    half = round(args.half_length / args.spacing)
    offsets = torch.arange(-half, half + 1) * args.spacing
    points = (z.detach()[:, None] + offsets.view(1, -1, 1, 1, 1) * direction[:, None]).flatten(0, 1)
    latents = run_map(sample_map, points, args.chunk).reshape(len(misses), len(offsets), *world.latent_shape)
    return fidelity, band_widths(world, caption_idx, latents, offsets), circles


CROFTON = 2 * math.pi * math.sqrt(2 / math.pi)  # mean crossings of a great circle per unit of boundary measure


def summarise(results) -> dict:
    """One row from `measure`'s results for every caption."""
    fidelity = sum(r[0] for r in results) / len(results)
    row = {"fidelity": fidelity, "off_mode": 1.0 - fidelity}
    bands = [r[1] for r in results if r[1]]
    row["num_lines"] = sum(len(b["width"]) for b in bands)
    if bands:
        cat = {key: torch.cat([b[key] for b in bands]) for key in ("width", "censored", "between_modes", "max_slope")}
        measured = cat["width"][~cat["censored"]]
        measured = measured[measured > 0]
        mean_width = float(len(measured) / (1.0 / measured).sum()) if len(measured) else math.nan
        row |= {
            "between_modes": float(cat["between_modes"].float().mean()),
            "censored": float(cat["censored"].float().mean()),
            "median_width": float(measured.median()) if len(measured) else math.nan,
            "mean_width": mean_width,
            "median_max_slope": float(cat["max_slope"].median()),
        }
    circles = [r[2] for r in results if r[2]]
    if circles:
        total = {key: sum(c[key] for c in circles) for key in circles[0]}
        boundary = total["crossings"] / (CROFTON * total["circles"])
        band_fraction = total["band_points"] / total["points"]
        row |= {
            "circle_off_mode": total["off_mode"] / total["points"],
            "crossings_per_circle": total["crossings"] / total["circles"],
            "boundary_measure": boundary,
            "clean_crossings": total["clean"] / max(total["crossings"], 1),
            "band_fraction": band_fraction,
            "boundary_mean_width": band_fraction / boundary if boundary else math.nan,
        }
    return row


def main(args) -> dict:
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers.generator import few_step_generate, one_step_generate, predict_eps
    from sim_diffusers.ground_truth import encode_world_captions, load_or_build_teacher
    from sim_diffusers.pipelines.pipeline_sim_one_step import SIMOneStepPipeline
    from sim_diffusers.sampling import dpm_solver_sample

    paths = [generator_path(g) for g in args.generators]  # bad paths fail before any model is loaded
    world, config = _common.world_and_config(args)
    teacher = PixArtAlphaPipeline.from_pretrained(load_or_build_teacher(world, config, args.cache_dir))
    with torch.no_grad():
        embeds, mask, _, _ = encode_world_captions(teacher, world)
    t_star = SIMOneStepPipeline.from_teacher(teacher).conditioning_timestep
    alphas_cumprod = teacher.scheduler.alphas_cumprod
    teacher.transformer.requires_grad_(False).eval()

    def condition(caption_idx, batch):
        return embeds[caption_idx : caption_idx + 1].expand(batch, -1, -1), mask[caption_idx : caption_idx + 1].expand(
            batch, -1
        )

    def one_step_map(model, caption_idx):
        return lambda z: one_step_generate(model, z, t_star, alphas_cumprod, *condition(caption_idx, len(z)))

    def few_step_map(model, caption_idx, timesteps):
        """z -> x0 of a K-step generator with the fresh noise of calls 2 .. K fixed (one draw per caption, the same
        for every z): a deterministic map of z, whose bands can be measured as the one-step generator's."""
        g = torch.Generator().manual_seed(EVALUATION_SEED + 100 + caption_idx)
        fresh = [torch.randn((1, *world.latent_shape), generator=g) for _ in timesteps[1:]]

        def sample(z):
            noise = [eps.expand(len(z), -1, -1, -1) for eps in fresh]
            return few_step_generate(
                model, z, timesteps, alphas_cumprod, *condition(caption_idx, len(z)), fresh_noise=noise
            )

        return sample

    def teacher_map(steps, caption_idx):
        def sample(z):
            cond = condition(caption_idx, len(z))
            return dpm_solver_sample(
                lambda x_t, t: predict_eps(teacher.transformer, x_t, t, *cond), teacher.scheduler, z, steps
            )

        return sample

    samplers = {f"teacher {steps} steps": lambda c, steps=steps: teacher_map(steps, c) for steps in args.teacher_steps}
    if args.untrained:
        samplers["untrained one-step generator"] = lambda c: one_step_map(teacher.transformer, c)
    for name, path in zip(args.generators, paths):
        model = load_generator(path, teacher.transformer).requires_grad_(False).eval()
        timesteps = args.generator_timesteps or generator_timesteps_of(path) or [t_star]
        if len(timesteps) == 1:
            samplers[name] = lambda c, model=model: one_step_map(model, c)
        else:
            samplers[name] = lambda c, model=model, ts=timesteps: few_step_map(model, c, ts)

    rows = {}
    for name, make_map in samplers.items():
        rows[name] = summarise([measure(world, c, make_map(c), args) for c in range(world.num_captions)])
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), flush=True)
    print(markdown_table(rows, LINE_COLUMNS))
    if args.circles:
        print(markdown_table(rows, CIRCLE_COLUMNS))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main(parse_args())
