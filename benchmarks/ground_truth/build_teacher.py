"""Train (or find in the cache) the tiny PixArt-alpha teacher of the Gaussian-mixture world, and report its accuracy.

    python -m benchmarks.ground_truth.build_teacher                 # default world, ~minutes on 1 core
    python -m benchmarks.ground_truth.build_teacher --world quick   # CI-sized, about a minute

Prints the teacher folder (a complete PixArt-alpha pipeline: PixArtAlphaPipeline.from_pretrained(path) loads it) and
the relative error |eps_theta - eps*|^2 / |eps*|^2 against the exact epsilon per timestep.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.ground_truth._common import add_world_and_teacher_args, world_and_config
from sim_diffusers.ground_truth import load_or_build_teacher, read_teacher_record


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_world_and_teacher_args(parser)
    parser.add_argument("--log_every", type=int, default=100)
    return parser.parse_args(input_args)


def accuracy_table(record: dict) -> str:
    errors = record["relative_eps_error"]
    lines = ["| t | rel. eps error (cond) | rel. eps error (uncond) | x0 RMS error (cond) |", "|---|---|---|---|"]
    rows = list(errors["per_timestep"].items()) + [("uniform", errors["uniform_t"])]
    for t, row in rows:
        cells = (row["conditional"], row["unconditional"], row["x0_rms_conditional"])
        lines.append(f"| {t} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def main(args):
    world, config = world_and_config(args)
    start = time.perf_counter()
    path = load_or_build_teacher(world, config, args.cache_dir, rebuild=args.rebuild, log_every=args.log_every)
    record = read_teacher_record(path)
    print(
        f"teacher: {path}  ({time.perf_counter() - start:.0f}s now; built in {record['build_seconds']}s, "
        f"training {record['train_seconds']}s, final loss {record['final_loss']:.4f})"
    )
    print(f"world: {record['world']}\nteacher config: {record['teacher']}")
    print(accuracy_table(record))


if __name__ == "__main__":
    main(parse_args())
