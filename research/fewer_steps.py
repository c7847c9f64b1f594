"""What a K-step generator gives when sampled with fewer calls: `pipe(..., num_inference_steps=n)` for n = 1 .. K,
scored on the held-out evaluation noise of `benchmarks.ground_truth.distill` (so n = K reproduces distill's row).

    python -m research.fewer_steps outputs/ground_truth_fewstep/runs/k4_s0-seed0 \\
        outputs/ground_truth_fewstep/runs/k2_s0-seed0 --out outputs/fewer_steps.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research._common import EVALUATION_SEED, add_world_and_teacher_args, world_and_config
from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.ground_truth.metrics import evaluate_pipeline_latents
from sim_diffusers.ground_truth.samplers import sample_pipeline_latents


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="Pipeline folders of K-step generators (distill's run folders).")
    parser.add_argument("--num_samples", type=int, default=256, help="Evaluation samples per caption.")
    parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    add_world_and_teacher_args(parser)
    return parser.parse_args(input_args)


def main(args) -> list[dict]:
    world, _ = world_and_config(args)
    rows = []
    print("| pipeline | K | calls | fidelity | coverage | weight TV | MMD |\n|---|---|---|---|---|---|---|")
    for folder in args.pipelines:
        pipe = SIMOneStepPipeline.from_pretrained(folder)
        k = len(pipe.generator_timesteps)
        for n in range(1, k + 1):
            latents = sample_pipeline_latents(
                pipe, world, args.num_samples, seed=EVALUATION_SEED, num_inference_steps=n
            )
            scores = evaluate_pipeline_latents(world, latents)["mean"]
            rows.append({"pipeline": Path(folder).name, "K": k, "calls": n, **scores})
            print(
                f"| {Path(folder).name} | {k} | {n} | {scores['fidelity']:.3f} | {scores['coverage']:.3f} | "
                f"{scores['weight_tv']:.3f} | {scores['mmd']:.4f} |",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(parse_args())
