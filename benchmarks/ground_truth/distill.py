"""Distil the ground-truth world's PixArt teacher with the real trainer and score the one-step generator exactly.

    python -m benchmarks.ground_truth.distill --world quick --max_train_steps 300 -- --regression_warmup_steps 200
    python -m benchmarks.ground_truth.distill --seeds 0 1 2 --baselines                   # the full benchmark
    python -m benchmarks.ground_truth.distill --name plain -- --regression_loss_weight 0  # an ablation: trainer args

For each seed it runs `accelerate launch training_scripts/train_sim_pixart.py` on the cached teacher with the world's
captions (checkpoints every --eval_every steps), loads every checkpoint's generator and the final pipeline with
`SIMOneStepPipeline.from_pretrained`, samples `output_type="latent"` and measures fidelity, mode coverage, mode-weight
error and MMD against the world (sim_diffusers.ground_truth). Coverage is reported over training, not only at the end.
With --baselines it adds the teacher with DPM-Solver++ at 1/2/4/20 steps, the exact-epsilon oracle and the untrained
generator. Writes results.json, results.md and results.png (metrics over training and example latents per caption).
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

from benchmarks.ground_truth._common import add_world_and_teacher_args, world_and_config
from sim_diffusers.ground_truth import (
    METRIC_KEYS,
    evaluate_pipeline_latents,
    load_or_build_teacher,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)

REPO = Path(__file__).resolve().parents[2]

# The benchmark's trainer settings. Guidance 1: the metrics compare against the world itself, which is what the
# unguided teacher samples; guided distillation is an ablation (`-- --guidance_scale 4.5`). Learning rates G 1e-5,
# F 1e-4 (the trainer's 1:10 ratio; its 5e-6 / 5e-5 are meant for the 600M PixArt-XL), so the regression warm-up runs
# at 1e-4. Everything else is the trainer's default, including the 1000-step regression warm-up. Later arguments
# (after `--`) override these.
TRAINER_DEFAULTS = [
    "--train_batch_size", "32", "--guidance_scale", "1.0", "--learning_rate", "1e-5", "--fake_score_learning_rate", "1e-4",
    "--report_to", "none",
]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_teacher_args(parser)
    parser.add_argument("--max_train_steps", type=int, default=1400, help="1000 of regression warm-up, then 400 of SIM.")
    parser.add_argument("--eval_every", type=int, default=100, help="Checkpoint and evaluation interval.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_samples", type=int, default=256, help="Samples per caption.")
    parser.add_argument("--baselines", action="store_true", help="Also score teacher, oracle and untrained generator.")
    parser.add_argument("--name", default="sim", help="Label of this configuration in the table.")
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "ground_truth"))
    parser.add_argument("trainer_args", nargs="*", help="After `--`: extra train_sim_pixart.py arguments.")
    return parser.parse_args(input_args)


def run_trainer(teacher, captions_file, output_dir, seed, args) -> float:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "training_scripts" / "train_sim_pixart.py"),
        "--pretrained_model_name_or_path", str(teacher), "--caption_file", str(captions_file),
        "--output_dir", str(output_dir), "--seed", str(seed), "--max_train_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(args.eval_every), *TRAINER_DEFAULTS, *args.trainer_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.num_threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"trainer failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def evaluate_generator(pipe, world, args):
    return evaluate_pipeline_latents(world, sample_pipeline_latents(pipe, world, args.num_samples, seed=10_000))


def distil_and_evaluate(teacher, world, captions_file, seed, args) -> dict:
    from diffusers import PixArtTransformer2DModel

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.training.checkpointing import checkpoint_step, complete_checkpoints

    run_dir = Path(args.output_dir) / "runs" / f"{args.name}-seed{seed}"
    seconds = run_trainer(teacher, captions_file, run_dir, seed, args)
    pipe = SIMOneStepPipeline.from_pretrained(run_dir)
    final = evaluate_generator(pipe, world, args)
    curve = []
    for checkpoint in complete_checkpoints(run_dir):
        pipe.transformer = PixArtTransformer2DModel.from_pretrained(checkpoint / "generator")
        curve.append({"step": checkpoint_step(checkpoint), **evaluate_generator(pipe, world, args)["mean"]})
    return {"seed": seed, "train_seconds": round(seconds, 1), "final": final, "curve": curve, "run_dir": str(run_dir)}


def baselines(teacher, world, args) -> dict:
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    rows = {}
    for steps in (1, 2, 4, 20):
        for guidance in (1.0, 4.5):
            latents = sample_teacher_latents(pipe, world, args.num_samples, steps, guidance, seed=10_000)
            rows[f"teacher {steps} step{'s' if steps > 1 else ''}, g={guidance:g}"] = evaluate_pipeline_latents(world, latents)
    rows["exact-eps oracle 20 steps, g=1"] = evaluate_pipeline_latents(
        world, sample_exact_latents(world, pipe.scheduler, args.num_samples, 20, 1.0, seed=10_000)
    )
    rows["untrained one-step generator"] = evaluate_generator(SIMOneStepPipeline.from_teacher(pipe), world, args)
    return rows


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (sample standard deviation over seeds) of the final metrics."""
    out = {}
    for key in METRIC_KEYS:
        values = [run["final"]["mean"][key] for run in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def markdown(name, summary, runs, baseline_rows, floor) -> str:
    head = "| sampler | fidelity | coverage | weight TV | MMD | off-caption |\n|---|---|---|---|---|---|\n"
    lines = []
    for label, row in (baseline_rows or {}).items():
        m = row["mean"]
        lines.append(f"| {label} | {m['fidelity']:.3f} | {m['coverage']:.3f} | {m['weight_tv']:.3f} | {m['mmd']:.4f} | {m['off_caption']:.3f} |")
    cells = [f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" if k != "mmd" else f"{summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" for k in ("fidelity", "coverage", "weight_tv", "mmd", "off_caption")]
    lines.append(f"| **SIM one step: {name}** ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | " + " | ".join(cells) + " |")
    lines.append(f"| exact samples (noise floor) | {floor['fidelity']:.3f} | {floor['coverage']:.3f} | {floor['weight_tv']:.3f} | {floor['mmd']:.4f} | {floor['off_caption']:.3f} |")
    curve = ["", "Over training (mean over seeds):", "", "| step | fidelity | coverage | weight TV | MMD |", "|---|---|---|---|---|"]
    steps = sorted({row["step"] for run in runs for row in run["curve"]})
    for step in steps:
        rows = [row for run in runs for row in run["curve"] if row["step"] == step]
        mean = {k: statistics.fmean(r[k] for r in rows) for k in METRIC_KEYS}
        curve.append(f"| {step} | {mean['fidelity']:.3f} | {mean['coverage']:.3f} | {mean['weight_tv']:.3f} | {mean['mmd']:.4f} |")
    return head + "\n".join(lines + curve) + "\n"


def figure(path, world, runs, teacher_latents=None):
    """Metrics over training (left) and example latents per caption (right: each row a caption, channel 0 shown)."""
    from PIL import Image, ImageDraw

    width, height, pad = 420, 260, 30
    canvas = Image.new("RGB", (width + 40 + 8 * 36, max(height, world.num_captions * 36 * 2 + 40)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([pad, pad, width - 10, height - pad], outline="black")
    colours = {"fidelity": (30, 100, 200), "coverage": (200, 60, 40), "weight_tv": (40, 150, 60)}
    max_step = max((row["step"] for run in runs for row in run["curve"]), default=1)
    for key, colour in colours.items():
        for run in runs:
            points = [(pad + (width - 10 - pad) * row["step"] / max_step, height - pad - (height - 2 * pad) * row[key]) for row in run["curve"]]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((pad + 5, pad + 5 + 12 * list(colours).index(key)), key, fill=colour)
    draw.text((pad, height - pad + 5), f"0 .. {max_step} steps; y: 0 .. 1", fill="black")
    x0 = width + 30
    sets = [("SIM", runs[0].get("examples"))] + ([("teacher", teacher_latents)] if teacher_latents else [])
    for s, (label, latents) in enumerate(sets):
        draw.text((x0, 5 + s * (world.num_captions * 36 + 20)), label, fill="black")
        for c, caption_latents in enumerate(latents or []):
            for j, latent in enumerate(caption_latents[:8]):
                tile = ((latent[0].clamp(-2, 2) + 2) / 4 * 255).byte().numpy()
                image = Image.fromarray(tile, "L").resize((32, 32), Image.NEAREST)
                canvas.paste(image, (x0 + j * 36, 20 + s * (world.num_captions * 36 + 20) + c * 36))
    canvas.save(path)


def main(args):
    world, config = world_and_config(args)
    teacher = load_or_build_teacher(world, config, args.cache_dir, args.rebuild, log_every=500)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    captions_file = output_dir / "captions.txt"
    captions_file.write_text("\n".join(world.captions) + "\n")

    from sim_diffusers import SIMOneStepPipeline

    runs = []
    for seed in args.seeds:
        print(f"[{args.name}] seed {seed}: training {args.max_train_steps} steps...", flush=True)
        run = distil_and_evaluate(teacher, world, captions_file, seed, args)
        pipe = SIMOneStepPipeline.from_pretrained(run["run_dir"])
        run["examples"] = [x[:8] for x in sample_pipeline_latents(pipe, world, 8, seed=20_000)]
        runs.append(run)
        m = run["final"]["mean"]
        print(f"  fidelity {m['fidelity']:.3f} coverage {m['coverage']:.3f} weight_tv {m['weight_tv']:.3f} mmd {m['mmd']:.4f} ({run['train_seconds']:.0f}s)", flush=True)
    baseline_rows = baselines(teacher, world, args) if args.baselines else None
    summary = summarise(runs)
    floor = runs[0]["final"]["floor"]
    table = markdown(args.name, summary, runs, baseline_rows, floor)
    stem = output_dir / args.name
    teacher_examples = None
    if baseline_rows:
        from diffusers import PixArtAlphaPipeline

        teacher_pipe = PixArtAlphaPipeline.from_pretrained(teacher)
        teacher_examples = sample_teacher_latents(teacher_pipe, world, 8, 20, 1.0, seed=20_000)
    figure(f"{stem}.png", world, runs, teacher_examples)
    for run in runs:
        run.pop("examples", None)
    record = {"name": args.name, "world": world.to_dict(), "teacher": str(teacher), "trainer_args": TRAINER_DEFAULTS + args.trainer_args,
              "max_train_steps": args.max_train_steps, "num_samples": args.num_samples, "summary": summary,
              "runs": runs, "baselines": baseline_rows}
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    Path(f"{stem}.md").write_text(table)
    print(table)
    return record


if __name__ == "__main__":
    main(parse_args())
