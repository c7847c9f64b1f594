"""Distil the ground-truth world's PixArt teacher with the real trainer and score the one-step generator exactly.

    python -m benchmarks.ground_truth.distill --world quick --max_train_steps 300 -- --regression_warmup_steps 200
    python -m benchmarks.ground_truth.distill --seeds 0 1 2 --baselines                   # the full benchmark
    python -m benchmarks.ground_truth.distill --name plain -- --regression_loss_weight 0  # an ablation: trainer args

Run from the repository root. For each seed it runs `accelerate launch training_scripts/train_sim_pixart.py` on the
cached teacher with the world's captions (checkpoints every --eval_every steps), loads every checkpoint's generator and
the final pipeline with `SIMOneStepPipeline.from_pretrained`, samples `output_type="latent"` and measures fidelity,
mode coverage, mode-weight error and MMD against the world (sim_diffusers.ground_truth), over training from step 0 (the
untrained generator, `SIMOneStepPipeline.from_teacher`) and at the end. With --baselines it adds the teacher with
DPM-Solver++ at 1/2/4/20 steps, the exact-epsilon oracle and the untrained generator. Prints the table with what each
number means and writes NAME-seedS.md (the same text), NAME-seedS.json (everything, per caption too, with the
trainer's own validation values) and NAME-seedS.png (metrics over training and example latents) to --output_dir (S:
the seeds, joined by dashes). The trainer validates against the teacher on the world's captions (`--validation_steps`,
default --eval_every), so its diversity ratio and teacher agreement, which need no ground truth, sit in the curve next
to the exact metrics (docs/training.md, "Is my run working?").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.ground_truth._common import EVALUATION_SEED, add_world_and_teacher_args, world_and_config
from benchmarks.ground_truth.figure import draw_figure
from sim_diffusers.ground_truth import (
    METRIC_KEYS,
    evaluate_pipeline_latents,
    load_or_build_teacher,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)
from sim_diffusers.training.validation import read_validation_log

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SEED = 20_000  # the noise of the figure's example latents (8 per caption)
# The trainer's validation values carried into the curve (training.validation): no ground truth needed for them.
VALIDATION_KEYS = ("diversity_ratio_min", "teacher_agreement")

# The benchmark's trainer settings. Guidance 1: the metrics compare against the world itself, which is what the
# unguided teacher samples; guided distillation is an ablation (`-- --guidance_scale 4.5`). Learning rates G 1e-5,
# F 1e-4 (the trainer's 1:10 ratio; its 5e-6 / 5e-5 are meant for the 600M PixArt-XL), so the regression warm-up runs
# at 1e-4. Everything else is the trainer's default, including the 1000-step regression warm-up. Later arguments
# (after `--`) override these.
TRAINER_DEFAULTS = [
    "--train_batch_size",
    "32",
    "--guidance_scale",
    "1.0",
    "--learning_rate",
    "1e-5",
    "--fake_score_learning_rate",
    "1e-4",
    "--report_to",
    "none",
]

COLUMNS = (
    ("fidelity", "fidelity"),
    ("coverage", "coverage"),
    ("weight_tv", "weight TV"),
    ("mmd", "MMD"),
    ("off_caption", "off-caption"),
)
MEANINGS = (
    ("fidelity", "share of samples on a mode of their own caption (1 is perfect; the 20-step teacher is the bar)"),
    ("coverage", "share of each caption's modes that receive at least 10% of their expected samples (1: none lost)"),
    ("weight TV", "total variation between the modes' sample shares and their true weights (0 is perfect)"),
    ("MMD", "kernel distance to exact samples of the world (lower is better; the last row is its noise floor)"),
    ("off-caption", "share of samples on a mode of another caption (0: every prompt respected)"),
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_teacher_args(parser)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=1400,
        help="The trainer's 1000 steps of regression warm-up, then 400 of SIM.",
    )
    parser.add_argument("--eval_every", type=int, default=100, help="Checkpoint and evaluation interval.")
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="The trainer's validation against the teacher (on the world's captions) every N steps; default: "
        "--eval_every, so that every evaluated checkpoint has the trainer's values next to the exact metrics.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption.")
    parser.add_argument("--baselines", action="store_true", help="Also score teacher, oracle and untrained generator.")
    parser.add_argument("--name", default="sim", help="Label of this configuration in the table.")
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "ground_truth"))
    parser.add_argument("trainer_args", nargs="*", help="After `--`: extra train_sim_pixart.py arguments.")
    return parser.parse_args(input_args)


def run_trainer(teacher, captions_file, output_dir, seed, args) -> float:
    captions = [line for line in Path(captions_file).read_text().splitlines() if line.strip()]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training_scripts" / "train_sim_pixart.py"),
        "--pretrained_model_name_or_path",
        str(teacher),
        "--caption_file",
        str(captions_file),
        "--output_dir",
        str(output_dir),
        "--seed",
        str(seed),
        "--max_train_steps",
        str(args.max_train_steps),
        "--checkpointing_steps",
        str(args.eval_every),
        "--validation_steps",
        str(args.validation_steps or args.eval_every),
        "--validation_prompts",
        *captions,
        *TRAINER_DEFAULTS,
        *args.trainer_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.num_threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"trainer failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def evaluate_generator(pipe, world, args):
    latents = sample_pipeline_latents(pipe, world, args.num_samples, seed=EVALUATION_SEED)
    return evaluate_pipeline_latents(world, latents)


def distil_and_evaluate(teacher, world, captions_file, seed, untrained: dict, args) -> dict:
    """One seed: train, then score the final pipeline and every checkpoint; the curve starts at step 0 with the
    untrained generator's metrics `untrained` (the trainer's starting point), and carries the trainer's own
    validation values (`add_validation_values`)."""
    from diffusers import PixArtTransformer2DModel

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.training.checkpointing import checkpoint_step, complete_checkpoints

    run_dir = Path(args.output_dir) / "runs" / f"{args.name}-seed{seed}"
    seconds = run_trainer(teacher, captions_file, run_dir, seed, args)
    pipe = SIMOneStepPipeline.from_pretrained(run_dir)
    final = evaluate_generator(pipe, world, args)
    examples = sample_pipeline_latents(pipe, world, 8, seed=EXAMPLE_SEED)
    curve = [{"step": 0, **untrained["mean"], "per_caption": untrained["per_caption"]}]
    for checkpoint in complete_checkpoints(run_dir):
        pipe.transformer = PixArtTransformer2DModel.from_pretrained(checkpoint / "generator")
        scores = evaluate_generator(pipe, world, args)
        curve.append({"step": checkpoint_step(checkpoint), **scores["mean"], "per_caption": scores["per_caption"]})
    validations = read_validation_log(run_dir)
    add_validation_values(curve, validations)
    trainer_args = json.loads((run_dir / "training_args.json").read_text())
    return {
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "final": final,
        "curve": curve,
        "run_dir": str(run_dir),
        "regression_warmup_steps": trainer_args.get("regression_warmup_steps"),
        "num_generator_steps": trainer_args.get("num_generator_steps") or 1,
        "collapse_threshold": trainer_args.get("validation_collapse_threshold"),
        "validations": validations,
        "examples": examples,
    }


def add_validation_values(curve: list[dict], validations: list[dict]) -> None:
    """Put the trainer's validation values (logs/validation.jsonl) next to the exact metrics of the same step: the
    minimum diversity ratio over captions and the mean teacher agreement in the row, each caption's own in its
    per-caption entry. Steps the trainer did not validate keep the exact metrics alone."""
    by_step = {record["step"]: record for record in validations}
    for row in curve:
        record = by_step.get(row["step"])
        if record is None:
            continue
        row.update({key: record[key] for key in VALIDATION_KEYS})
        for caption_row in row.get("per_caption", []):
            values = record["prompts"].get(caption_row["caption"])
            if values is not None:
                caption_row.update({key: values[key] for key in ("diversity_ratio", "teacher_agreement")})


def baselines(teacher_pipe, world, untrained: dict, args) -> dict:
    rows = {}
    for steps in (1, 2, 4, 20):
        for guidance in (1.0, 4.5):
            latents = sample_teacher_latents(teacher_pipe, world, args.num_samples, steps, guidance, EVALUATION_SEED)
            label = f"teacher {steps} step{'s' if steps > 1 else ''}, g={guidance:g}"
            rows[label] = evaluate_pipeline_latents(world, latents)
    rows["exact-eps oracle 20 steps, g=1"] = evaluate_pipeline_latents(
        world, sample_exact_latents(world, teacher_pipe.scheduler, args.num_samples, 20, 1.0, seed=EVALUATION_SEED)
    )
    rows["untrained one-step generator"] = untrained
    return rows


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (sample standard deviation over seeds) of the final metrics."""
    out = {}
    for key in METRIC_KEYS:
        values = [run["final"]["mean"][key] for run in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def mean_curve(runs: list[dict]) -> list[dict]:
    """The metrics at every evaluated step, averaged over the seeds that reached it; the trainer's validation values
    too where every such seed has them."""
    steps = sorted({row["step"] for run in runs for row in run["curve"]})
    rows = [[row for run in runs for row in run["curve"] if row["step"] == step] for step in steps]
    curve = []
    for step, at in zip(steps, rows):
        keys = [*METRIC_KEYS, *(k for k in VALIDATION_KEYS if all(k in r for r in at))]
        curve.append({"step": step, **{k: statistics.fmean(r[k] for r in at) for k in keys}})
    return curve


def _cell(key: str, value: float) -> str:
    return f"{value:.4f}" if key == "mmd" else f"{value:.3f}"


def seeds_text(runs) -> str:
    return f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"


def steps_text(runs) -> str:
    """'one step', or 'K steps' for a K-step generator (--num_generator_steps)."""
    k = runs[0].get("num_generator_steps", 1)
    return "one step" if k == 1 else f"{k} steps"


def report(name, world, summary, runs, baseline_rows, floor, args) -> str:
    """The benchmark's printed (and NAME-seedS.md) text: the table, what each number means, the curve over training."""
    seeds = seeds_text(runs)
    header = "| sampler | " + " | ".join(label for _, label in COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|"
    lines = [
        f"Ground-truth benchmark: {world.num_captions} captions x {world.modes_per_caption} modes in "
        f"{'x'.join(map(str, world.latent_shape))} latents, {args.num_samples} samples per caption, "
        f"{args.max_train_steps} training steps, {seeds}.",
        "",
        header,
    ]
    for label, row in (baseline_rows or {}).items():
        lines.append(f"| {label} | " + " | ".join(_cell(k, row["mean"][k]) for k, _ in COLUMNS) + " |")
    spread = len(runs) > 1
    cells = [
        _cell(k, summary[k]["mean"]) + (f" ± {_cell(k, summary[k]['std'])}" if spread else "") for k, _ in COLUMNS
    ]
    lines.append(f"| **SIM {steps_text(runs)}: {name}** ({seeds}) | " + " | ".join(cells) + " |")
    lines.append("| exact samples (noise floor) | " + " | ".join(_cell(k, floor[k]) for k, _ in COLUMNS) + " |")
    lines += ["", "What the numbers mean:"]
    lines += [f"  {label:<12} {meaning}" for label, meaning in MEANINGS]
    lines += [
        "",
        f"Over training (step 0 = the untrained generator{', mean over seeds' if spread else ''}):",
        "",
        "| step | fidelity | coverage | weight TV | MMD | diversity ratio (min) | teacher agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in mean_curve(runs):
        cells = [_cell(k, row[k]) for k in METRIC_KEYS[:4]] + [
            _cell(k, row[k]) if k in row else "-" for k in VALIDATION_KEYS
        ]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def output_stem(name: str, seeds) -> str:
    """NAME-seedS (or NAME-seedS1-S2-...): one-seed runs of one configuration started in parallel keep their own
    files."""
    return f"{name}-seed{'-'.join(str(s) for s in seeds)}"


def main(args):
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline

    world, config = world_and_config(args)
    teacher = load_or_build_teacher(world, config, args.cache_dir, args.rebuild, log_every=500)
    print(f"teacher: {teacher}", flush=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    captions_file = output_dir / "captions.txt"
    captions_file.write_text("\n".join(world.captions) + "\n")
    teacher_pipe = PixArtAlphaPipeline.from_pretrained(teacher)
    teacher_pipe.set_progress_bar_config(disable=True)
    untrained = evaluate_generator(SIMOneStepPipeline.from_teacher(teacher_pipe), world, args)

    runs = []
    for seed in args.seeds:
        print(f"[{args.name}] seed {seed}: training {args.max_train_steps} steps...", flush=True)
        runs.append(distil_and_evaluate(teacher, world, captions_file, seed, untrained, args))
        m = runs[-1]["final"]["mean"]
        print(
            f"  fidelity {m['fidelity']:.3f}  coverage {m['coverage']:.3f}  weight TV {m['weight_tv']:.3f}  "
            f"MMD {m['mmd']:.4f}  ({runs[-1]['train_seconds']:.0f}s)",
            flush=True,
        )
    baseline_rows = baselines(teacher_pipe, world, untrained, args) if args.baselines else None
    summary = summarise(runs)
    text = report(args.name, world, summary, runs, baseline_rows, runs[0]["final"]["floor"], args)

    stem = output_dir / output_stem(args.name, args.seeds)
    exact = [world.sample_x0(c, 8, torch.Generator().manual_seed(EXAMPLE_SEED + c)) for c in range(world.num_captions)]
    teacher_examples = sample_teacher_latents(teacher_pipe, world, 8, 20, 1.0, seed=EXAMPLE_SEED)
    references = None
    if baseline_rows:
        references = {"teacher, 20 steps": baseline_rows["teacher 20 steps, g=1"]["mean"]["fidelity"]}
    draw_figure(
        f"{stem}.png",
        f"SIM one-step distillation on the ground-truth world ({args.name}, {seeds_text(runs)})",
        mean_curve(runs),
        [
            ("exact samples of the world", exact),
            ("teacher, 20 DPM-Solver++ steps", teacher_examples),
            (f"SIM {steps_text(runs)} ({args.name}, seed {runs[0]['seed']})", runs[0]["examples"]),
        ],
        world.captions,
        references,
        runs[0]["regression_warmup_steps"],
    )
    for run in runs:
        run.pop("examples")
    record = {
        "name": args.name,
        "world": world.to_dict(),
        "teacher": str(teacher),
        "trainer_args": TRAINER_DEFAULTS + args.trainer_args,
        "max_train_steps": args.max_train_steps,
        "num_samples": args.num_samples,
        "summary": summary,
        "runs": runs,
        "baselines": baseline_rows,
    }
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    Path(f"{stem}.md").write_text(text)
    print("\n" + text)
    print(f"Wrote {stem}.md, {stem}.json and {stem}.png (metrics over training, example latents).")
    return record


if __name__ == "__main__":
    main(parse_args())
