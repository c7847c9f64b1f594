"""Does the trainer's validation signal, which needs no ground truth, tell a collapsing run from a working one? The
evidence behind docs/training.md, "Is my run working?", from `benchmarks.ground_truth.distill` runs.

    python -m benchmarks.ground_truth.collapse_signal report outputs/ground_truth/{plain,default}-seed*.json \\
        --figure docs/images/collapse_signal.png
    python -m benchmarks.ground_truth.collapse_signal noise_count outputs/ground_truth/runs/default-seed0 \\
        outputs/ground_truth/runs/plain-seed0/checkpoint-100 --num_samples 4 8 16 32 --repeats 10

`report` reads distill's NAME-seedS.json files (one panel per NAME), whose curves hold the exact metrics of every
checkpoint next to the trainer's own validation values (logs/validation.jsonl) of the same step, and prints:
  - the correlation, over every validated checkpoint of every run, of the minimum diversity ratio with the true
    coverage and weight TV (mean over captions), and per caption of its diversity ratio with its coverage and TV;
  - per run, the first step at which the trainer warned (minimum ratio below --threshold, default the trainer's)
    and the true coverage there and at the last step before coverage fell below 0.5;
  - with --figure, `figure.draw_signal_figure`: the signal and the true coverage over steps, a panel per NAME.
`noise_count` re-runs the validation's statistics (`sim_diffusers.training.validation`'s noises, the teacher's ODE
samples and the one-step generator from the same noises) on pipelines or checkpoints for several N and noise seeds,
so that the spread of the minimum ratio at each N (false alarms on a working generator, misses on a collapsed one)
can be read off.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from benchmarks.ground_truth._common import add_world_and_teacher_args, world_and_config
from benchmarks.ground_truth.figure import draw_signal_figure, first_warning
from sim_diffusers.training.validation import ValidationConfig

THRESHOLD = ValidationConfig().collapse_threshold


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="Correlations, warnings and the figure from distill's JSON files.")
    report.add_argument("runs", nargs="+", help="distill's NAME-seedS.json files.")
    report.add_argument("--threshold", type=float, default=THRESHOLD, help="The collapse threshold to evaluate.")
    report.add_argument("--figure", default=None, help="Write the signal figure (PNG) here.")
    report.add_argument(
        "--label", action="append", default=[], metavar="NAME=TEXT", help="The figure's title of NAME's panel."
    )
    report.add_argument("--json", default=None, help="Write the numbers of the report here.")
    count = sub.add_parser("noise_count", help="The minimum ratio's spread over noise draws for several N.")
    add_world_and_teacher_args(count)
    count.add_argument("generators", nargs="+", help="Pipeline folders or checkpoint-N folders (their generator).")
    count.add_argument("--num_samples", type=int, nargs="+", default=[4, 8, 16, 32])
    count.add_argument("--repeats", type=int, default=10, help="Noise seeds per N.")
    count.add_argument("--teacher_steps", type=int, default=ValidationConfig().teacher_steps)
    count.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    count.add_argument("--json", default=None)
    return parser.parse_args(input_args)


# ---------------------------------------------------------------------------------------------------------------------
# report


def pearson(xs, ys) -> float:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return float("nan")
    return statistics.correlation(xs, ys)


def spearman(xs, ys) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    return pearson(ranks(list(xs)), ranks(list(ys)))


def load_runs(paths) -> list[dict]:
    """[{"name", "seed", "curve"}] of every run of every distill JSON file."""
    runs = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        for run in record["runs"]:
            runs.append({"name": record["name"], "seed": run["seed"], "curve": run["curve"]})
    return runs


def correlations(runs: list[dict]) -> dict:
    """Correlation of the signal with the true metrics over every checkpoint that has both (step 0 included)."""
    rows = [row for run in runs for row in run["curve"] if "diversity_ratio_min" in row]
    captions = [c for row in rows for c in row.get("per_caption", []) if "diversity_ratio" in c]
    out = {"checkpoints": len(rows), "caption_checkpoints": len(captions)}
    for key in ("coverage", "weight_tv"):
        signal, truth = [r["diversity_ratio_min"] for r in rows], [r[key] for r in rows]
        out[f"min_ratio_vs_{key}"] = {"pearson": pearson(signal, truth), "spearman": spearman(signal, truth)}
        signal, truth = [c["diversity_ratio"] for c in captions], [c[key] for c in captions]
        out[f"caption_ratio_vs_caption_{key}"] = {
            "pearson": pearson(signal, truth),
            "spearman": spearman(signal, truth),
        }
        signal, truth = [r["teacher_agreement"] for r in rows], [r[key] for r in rows]
        out[f"agreement_vs_{key}"] = {"pearson": pearson(signal, truth), "spearman": spearman(signal, truth)}
    return out


def warnings_against_coverage(run: dict, threshold: float) -> dict:
    """When the trainer warned, against when the true coverage fell below 0.5 (steps after 0)."""
    curve = run["curve"]
    warned = first_warning(curve, threshold)
    coverage_at = {row["step"]: row["coverage"] for row in curve}
    fell = next((row["step"] for row in curve if row["coverage"] < 0.5), None)
    validated = [row for row in curve if "diversity_ratio_min" in row and row["step"] > 0]
    return {
        "name": run["name"],
        "seed": run["seed"],
        "first_warning": warned,
        "coverage_at_warning": coverage_at.get(warned),
        "coverage_below_0.5_at": fell,
        "warned_before_coverage_below_0.5": warned is not None and (fell is None or warned < fell),
        "lowest_min_ratio": min((row["diversity_ratio_min"] for row in validated), default=None),
        "final_coverage": curve[-1]["coverage"],
        "validations": len(validated),
    }


def report(args) -> dict:
    runs = load_runs(args.runs)
    result = {
        "threshold": args.threshold,
        "correlations": correlations(runs),
        "runs": [warnings_against_coverage(run, args.threshold) for run in runs],
    }
    c = result["correlations"]
    print(f"{c['checkpoints']} validated checkpoints ({c['caption_checkpoints']} caption x checkpoint pairs):")
    for key, label in (
        ("min_ratio_vs_coverage", "min diversity ratio vs coverage"),
        ("min_ratio_vs_weight_tv", "min diversity ratio vs weight TV"),
        ("caption_ratio_vs_caption_coverage", "per caption: ratio vs its coverage"),
        ("caption_ratio_vs_caption_weight_tv", "per caption: ratio vs its weight TV"),
        ("agreement_vs_coverage", "teacher agreement vs coverage"),
        ("agreement_vs_weight_tv", "teacher agreement vs weight TV"),
    ):
        print(f"  {label:<38} Pearson {c[key]['pearson']:+.3f}  Spearman {c[key]['spearman']:+.3f}")
    print(f"\nWarnings at threshold {args.threshold:g}:")
    print("| run | seed | first warning | coverage there | coverage < 0.5 from | lowest min ratio | final coverage |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        cov = "-" if r["coverage_at_warning"] is None else f"{r['coverage_at_warning']:.3f}"
        low = "-" if r["lowest_min_ratio"] is None else f"{r['lowest_min_ratio']:.3f}"
        print(
            f"| {r['name']} | {r['seed']} | {r['first_warning'] or 'none'} | {cov} | "
            f"{r['coverage_below_0.5_at'] or 'never'} | {low} | {r['final_coverage']:.3f} |"
        )
    if args.figure:
        names = list(dict.fromkeys(run["name"] for run in runs))
        labels = dict(item.split("=", 1) for item in args.label)
        panels = [(labels.get(name, name), [run["curve"] for run in runs if run["name"] == name]) for name in names]
        draw_signal_figure(
            args.figure,
            "The trainer's diversity ratio next to the true mode coverage (ground-truth world)",
            panels,
            args.threshold,
        )
        print(f"\nWrote {args.figure}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# noise_count


def _generator_of(path: Path):
    from diffusers import PixArtTransformer2DModel

    folder = path / "generator" if (path / "generator").is_dir() else path / "transformer"
    return PixArtTransformer2DModel.from_pretrained(folder).eval()


@torch.no_grad()
def min_ratios(teacher_pipe, generator, world, num_samples: int, seeds, teacher_steps: int) -> list[float]:
    """The validation's minimum diversity ratio over the world's captions, one value per noise seed."""
    from sim_diffusers.diversity import diversity_ratio
    from sim_diffusers.generator import one_step_generate
    from sim_diffusers.sampling import ode_scheduler, teacher_ode_sample
    from sim_diffusers.schedule import DEFAULT_SIGMA_INIT, alphas_cumprod_of, timestep_for_ve_sigma
    from sim_diffusers.training.text_embeddings import OnlineTextEncoder
    from sim_diffusers.training.validation import validation_noise

    encoder = OnlineTextEncoder(teacher_pipe, "cpu", torch.float32, 120, True)
    embeds, mask = encoder(list(world.captions))
    negative, negative_mask = encoder.negative()
    scheduler = ode_scheduler(teacher_pipe.scheduler)
    alphas_cumprod = alphas_cumprod_of(teacher_pipe.scheduler)
    t_star = timestep_for_ve_sigma(alphas_cumprod, DEFAULT_SIGMA_INIT)
    out = []
    for seed in seeds:
        noise = validation_noise(seed, world.num_captions, num_samples, world.latent_shape)
        ratios = []
        for c in range(world.num_captions):
            z, n = noise[c], num_samples
            e, m = embeds[c : c + 1].expand(n, -1, -1), mask[c : c + 1].expand(n, -1)
            ne, nm = negative.expand(n, -1, -1), negative_mask.expand(n, -1)
            teacher = teacher_ode_sample(teacher_pipe.transformer, scheduler, z, e, m, ne, nm, 1.0, teacher_steps)
            x0 = one_step_generate(generator, z, t_star, alphas_cumprod, e, m)
            ratios.append(diversity_ratio(x0, teacher))
        out.append(min(ratios))
    return out


def noise_count(args) -> dict:
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers.ground_truth import load_or_build_teacher

    world, config = world_and_config(args)
    teacher_pipe = PixArtAlphaPipeline.from_pretrained(load_or_build_teacher(world, config, args.cache_dir))
    rows = []
    for path in map(Path, args.generators):
        generator = _generator_of(path)
        for n in args.num_samples:
            seeds = range(1000, 1000 + args.repeats)  # apart from the trainer's own --seed values
            values = min_ratios(teacher_pipe, generator, world, n, seeds, args.teacher_steps)
            below = {f"{t:g}": sum(v < t for v in values) / len(values) for t in args.thresholds}
            rows.append(
                {
                    "generator": str(path),
                    "num_samples": n,
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "share_below": below,
                }
            )
            r = rows[-1]
            shares = "  ".join(f"<{t}: {s:.1f}" for t, s in below.items())
            print(
                f"{path.parent.name}/{path.name}  N={n:<3d} min ratio {r['mean']:.3f} ± {r['std']:.3f} "
                f"[{r['min']:.3f}, {r['max']:.3f}]  {shares}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return {"rows": rows, "finite": all(math.isfinite(r["mean"]) for r in rows)}


def main(args):
    return report(args) if args.command == "report" else noise_count(args)


if __name__ == "__main__":
    main(parse_args())
