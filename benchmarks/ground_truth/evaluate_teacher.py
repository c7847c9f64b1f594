"""Sample the ground-truth world's teacher, the exact-epsilon oracle and the untrained one-step generator, and score
each against the world's exact metrics.

    python -m benchmarks.ground_truth.evaluate_teacher                  # default world
    python -m benchmarks.ground_truth.evaluate_teacher --world quick    # CI-sized

Rows: exact samples (the metrics' noise floor), the oracle (the teacher's DPM-Solver++ driven by the exact epsilon)
and the teacher (PixArtAlphaPipeline) at each number of steps and guidance scale, and
SIMOneStepPipeline.from_teacher(teacher) before any distillation. Every sampler starts caption i from noise seeded
`--seed + i`. Prints a markdown table and writes everything (per caption too) to --output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.ground_truth._common import add_world_and_teacher_args, world_and_config
from sim_diffusers.ground_truth import (
    evaluate_pipeline_latents,
    load_or_build_teacher,
    read_teacher_record,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)

REPO = Path(__file__).resolve().parents[2]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_world_and_teacher_args(parser)
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 20], help="DPM-Solver++ steps.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 4.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "outputs" / "ground_truth" / "evaluate_teacher.json"))
    return parser.parse_args(input_args)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sampler | steps | guidance | fidelity | coverage | weight TV | MMD | off-caption | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['guidance']} | {m['fidelity']:.3f} | {m['coverage']:.3f} | "
            f"{m['weight_tv']:.3f} | {m['mmd']:.3f} | {m['off_caption']:.3f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(args):
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline

    world, config = world_and_config(args)
    teacher_path = load_or_build_teacher(world, config, args.cache_dir, rebuild=args.rebuild, log_every=200)
    record = read_teacher_record(teacher_path)
    teacher = PixArtAlphaPipeline.from_pretrained(teacher_path)
    teacher.set_progress_bar_config(disable=True)
    rows, results = [], {}

    def add(sampler: str, steps, guidance, sample):
        start = time.perf_counter()
        latents = sample()
        seconds = time.perf_counter() - start
        evaluation = evaluate_pipeline_latents(world, latents)
        rows.append(dict(sampler=sampler, steps=steps, guidance=guidance, metrics=evaluation["mean"], seconds=seconds))
        results[f"{sampler}/{steps}/{guidance}"] = dict(rows[-1], per_caption=evaluation["per_caption"])
        print(f"{sampler} steps={steps} guidance={guidance}: {evaluation['mean']}  ({seconds:.1f}s)", flush=True)
        return evaluation

    # 1. The noise floor: exact samples scored like any sampler
    floor = add(
        "exact samples",
        "-",
        "-",
        lambda: [
            world.sample_x0(i, args.num_samples, torch.Generator().manual_seed(args.seed + 100 + i))
            for i in range(world.num_captions)
        ],
    )

    # 2. The oracle and the teacher, with the teacher's DPM-Solver++
    for guidance in args.guidance_scales:
        for steps in args.steps:
            add(
                "oracle (exact eps)",
                steps,
                guidance,
                lambda: sample_exact_latents(world, teacher.scheduler, args.num_samples, steps, guidance, args.seed),
            )
            add(
                "teacher",
                steps,
                guidance,
                lambda: sample_teacher_latents(teacher, world, args.num_samples, steps, guidance, args.seed),
            )

    # 3. The one-step generator before distillation: the teacher's denoiser at t*
    generator = SIMOneStepPipeline.from_teacher(teacher_path)
    add(
        f"generator, untrained (t*={generator.conditioning_timestep})",
        1,
        1.0,
        lambda: sample_pipeline_latents(generator, world, args.num_samples, args.seed),
    )

    table = markdown_table(rows)
    print(
        f"\nteacher {teacher_path} (relative eps error over uniform t: "
        f"{record['relative_eps_error']['uniform_t']['conditional']:.4f})\n"
    )
    print(table)
    print(f"\nexact-sample noise floor: MMD {floor['floor']['mmd']:.3f}, weight TV {floor['floor']['weight_tv']:.3f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            dict(
                args=vars(args),
                teacher_path=str(teacher_path),
                teacher_record=record,
                world=world.to_dict(),
                captions=list(world.captions),
                fidelity_radius=world.fidelity_radius,
                mmd_bandwidth=world.mmd_bandwidth,
                noise_floor=floor["floor"],
                rows=rows,
                results=results,
                table=table,
            ),
            indent=2,
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main(parse_args())
