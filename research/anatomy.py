"""What the off-mode samples look like: global blends of two modes, or samples whose regions follow different modes.

Scores generators (checkpoint or pipeline folders of `benchmarks.ground_truth.distill` runs) and the teacher at a
few solver steps on the evaluation noise, and breaks their off-mode samples down with
`research.diagnostics.off_mode_anatomy`:

    python -m research.anatomy outputs/ground_truth/runs/sim-seed0/checkpoint-1400 --teacher_steps 8 20

Each row: fidelity, the off-mode fraction, and over off-mode samples the share of contested blocks (those where the
sample's two nearest modes differ) committed to the nearest mode, to the second, or in between, and the fraction of
off-mode samples whose contested blocks disagree (some near one mode, some near the other).
"""

from __future__ import annotations

import argparse

from research import _common
from research._common import (
    EVALUATION_SEED,
    add_world_and_teacher_args,
    generator_path,
    load_generator,
    markdown_table,
)

COLUMNS = ("fidelity", "off_mode", "committed_nearest", "committed_second", "in_between", "regionally_inconsistent")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "generators",
        nargs="*",
        help="Generators: checkpoint, pipeline or transformer folders, or safetensors of screen.py / fit_ode_map.py "
        "--save.",
    )
    parser.add_argument(
        "--teacher_steps",
        type=int,
        nargs="*",
        default=[],
        help="Also the teacher with DPM-Solver++ at these steps (g = 1).",
    )
    parser.add_argument("--untrained", action="store_true", help="Also the untrained one-step generator.")
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption.")
    add_world_and_teacher_args(parser)
    return parser.parse_args(input_args)


def row(world, latents) -> dict:
    from research.diagnostics import off_mode_anatomy
    from sim_diffusers.ground_truth import evaluate_pipeline_latents

    parts = [off_mode_anatomy(world, i, x) for i, x in enumerate(latents)]
    mean = {key: sum(p[key] for p in parts) / len(parts) for key in COLUMNS[1:]}
    return {"fidelity": evaluate_pipeline_latents(world, latents)["mean"]["fidelity"], **mean}


def main(args) -> dict:
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.ground_truth import load_or_build_teacher, sample_pipeline_latents, sample_teacher_latents

    paths = [generator_path(g) for g in args.generators]  # bad paths fail before any model is loaded
    world, config = _common.world_and_config(args)
    teacher = PixArtAlphaPipeline.from_pretrained(load_or_build_teacher(world, config, args.cache_dir))
    teacher.set_progress_bar_config(disable=True)
    one_step = SIMOneStepPipeline.from_teacher(teacher)
    rows = {}
    for steps in args.teacher_steps:
        rows[f"teacher {steps} steps"] = row(
            world, sample_teacher_latents(teacher, world, args.num_samples, steps, seed=EVALUATION_SEED)
        )
    if args.untrained:
        rows["untrained one-step generator"] = row(
            world, sample_pipeline_latents(one_step, world, args.num_samples, seed=EVALUATION_SEED)
        )
    for name, path in zip(args.generators, paths):
        one_step.transformer = load_generator(path, teacher.transformer)
        rows[name] = row(world, sample_pipeline_latents(one_step, world, args.num_samples, seed=EVALUATION_SEED))
    print(markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main(parse_args())
