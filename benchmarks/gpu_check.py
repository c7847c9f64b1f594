#!/usr/bin/env python
"""The GPU check: both benchmarks at 512 and 1024 px in bf16 on one GPU, in one command, inside a fixed time budget.

Prepare here (once, no network: copies the pure-Python packages the device image lacks out of .venv):
    .venv/bin/python -m benchmarks.gpu_check --prepare
Run on the lent machine (the device tool's `run`; see docs/performance.md for the exact call):
    python3 benchmarks/gpu_check.py --out $OUT
Smoke test of the same orchestration on CPU with the tiny config (what tests/test_benchmarks.py runs):
    .venv/bin/python -m benchmarks.gpu_check --smoke --out /tmp/gpu_check_smoke

Writes into --out: gpu_results.json (every job's full JSON, keyed by job), gpu_results.md (the summary tables) and
gpu_check.log (all output). Jobs run one per process (fresh CUDA memory statistics), most important first; each
gets what is left of --budget_s, and jobs that would start with under a minute left are skipped and listed as such.
This script imports only the standard library, so it starts at once; the jobs import torch and diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE_DIR = REPO_ROOT / ".gpu_site"  # ignored by git; carried to the device by `run(carry=[".gpu_site"])`
SITE_ARCHIVE = SITE_DIR / "site.tar.gz"
# What the device image lacks (its package list has torch, transformers, accelerate, peft, safetensors,
# huggingface-hub, sentencepiece, tokenizers, but not diffusers). diffusers is pure Python; on Python >= 3.8 it needs
# no importlib_metadata backport.
CARRIED_PACKAGES = ("diffusers",)
MIN_JOB_S = 60

# (name, script, arguments, cap in seconds). Order = priority.
GPU_JOBS = [
    (
        "train_xl-512",
        "train_step.py",
        [
            "--config",
            "xl-512",
            "--precision",
            "bf16",
            "--batch_size",
            "4",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--ablations",
        ],
        110,
    ),
    (
        # The memory plan's check: full iterations only, so that max_memory_allocated is the iteration's.
        "memory_xl-1024_b2",
        "train_step.py",
        [
            "--config",
            "xl-1024",
            "--precision",
            "bf16",
            "--batch_size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--iteration_only",
            "--phases",
            "sim",
        ],
        70,
    ),
    (
        "train_xl-1024",
        "train_step.py",
        ["--config", "xl-1024", "--precision", "bf16", "--batch_size", "1", "--steps", "3", "--warmup", "1"],
        100,
    ),
    (
        "inference_xl-512",
        "inference.py",
        ["--config", "xl-512", "--precision", "bf16", "--batch_sizes", "1", "8", "--runs", "3"],
        80,
    ),
    (
        "inference_xl-1024",
        "inference.py",
        ["--config", "xl-1024", "--precision", "bf16", "--batch_sizes", "1", "8", "--runs", "2"],
        110,
    ),
    (
        "inference_xl-1024_cached_taesd",
        "inference.py",
        [
            "--config",
            "xl-1024",
            "--precision",
            "bf16",
            "--batch_sizes",
            "1",
            "8",
            "--teacher_steps",
            "20",
            "--runs",
            "2",
            "--cached_prompt_embeddings",
            "--tiny_vae",
        ],
        70,
    ),
    (
        "train_xl-1024_checkpointing_b4",
        "train_step.py",
        [
            "--config",
            "xl-1024",
            "--precision",
            "bf16",
            "--batch_size",
            "4",
            "--gradient_checkpointing",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--iteration_only",
            "--phases",
            "sim",
        ],
        70,
    ),
    (
        "train_xl-512_lora64",
        "train_step.py",
        [
            "--config",
            "xl-512",
            "--precision",
            "bf16",
            "--batch_size",
            "4",
            "--lora_rank",
            "64",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--iteration_only",
            "--phases",
            "sim",
        ],
        60,
    ),
    (
        "train_xl-512_compile",
        "train_step.py",
        [
            "--config",
            "xl-512",
            "--precision",
            "bf16",
            "--batch_size",
            "4",
            "--compile",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--iteration_only",
            "--phases",
            "sim",
        ],
        240,
    ),
]
SMOKE_JOBS = [
    ("train_tiny", "train_step.py", ["--config", "tiny", "--steps", "1", "--warmup", "0", "--ablations"], 120),
    (
        "inference_tiny",
        "inference.py",
        ["--config", "tiny", "--batch_sizes", "1", "--teacher_steps", "2", "--runs", "1", "--warmup", "0"],
        120,
    ),
]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_results"), help="Output folder (default: $OUT).")
    parser.add_argument("--budget_s", type=float, default=330.0, help="Wall-clock budget of all jobs together.")
    parser.add_argument(
        "--prepare", action="store_true", help="Pack the packages the device lacks into .gpu_site/ and exit."
    )
    parser.add_argument("--smoke", action="store_true", help="Run the orchestration with tiny jobs (CPU is fine).")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these job names.")
    return parser.parse_args(input_args)


def prepare() -> Path:
    """Pack the CARRIED_PACKAGES (and their dist-info, for version look-ups) from this interpreter's site-packages."""
    import importlib.metadata
    import importlib.util

    SITE_DIR.mkdir(exist_ok=True)
    with tarfile.open(SITE_ARCHIVE, "w:gz") as tar:
        for name in CARRIED_PACKAGES:
            package_dir = Path(importlib.util.find_spec(name).origin).parent
            dist = importlib.metadata.distribution(name)
            dist_info = Path(dist._path)  # the .dist-info folder
            for path in (package_dir, dist_info):
                tar.add(path, arcname=path.name, filter=lambda info: None if "__pycache__" in info.name else info)
            print(f"packed {name} {dist.version} from {package_dir.parent}")
    _ignore_in_git(".gpu_site/")
    print(f"wrote {SITE_ARCHIVE} ({SITE_ARCHIVE.stat().st_size / 2**20:.1f} MiB)")
    return SITE_ARCHIVE


def _ignore_in_git(pattern: str) -> None:
    """The device tool carries only ignored paths named in `carry`: make sure git ignores .gpu_site/."""
    probe = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", pattern], check=False)
    if probe.returncode == 0:
        return
    exclude = REPO_ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.write(f"/{pattern}\n")
    print(f"added /{pattern} to {exclude}")


def job_environment() -> dict:
    """Environment of the jobs: the unpacked carried packages (if any) and the repository on PYTHONPATH."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO_ROOT)]
    if SITE_ARCHIVE.exists():
        stat = SITE_ARCHIVE.stat()
        target = Path(f"/tmp/sim_gpu_site-{stat.st_size}-{int(stat.st_mtime)}")
        if not target.exists():
            with tarfile.open(SITE_ARCHIVE) as tar:
                tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        paths.insert(0, str(target))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_jobs(jobs, out: Path, budget_s: float, log) -> dict:
    env = job_environment()
    deadline = time.monotonic() + budget_s
    results = {}
    for name, script, job_args, cap in jobs:
        left = deadline - time.monotonic()
        if left < MIN_JOB_S and results:
            results[name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
            log(f"== {name}: skipped ({left:.0f} s left)")
            continue
        timeout = max(min(cap, left), MIN_JOB_S)
        json_path = out / f".{name}.json"
        # Run as modules of the `benchmarks` package from the repository root (no sys.path edits anywhere).
        command = [sys.executable, "-m", f"benchmarks.{Path(script).stem}", *job_args, "--json", str(json_path)]
        log(f"== {name}: {' '.join(command[1:])} (timeout {timeout:.0f} s)")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
            log(proc.stdout + proc.stderr)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as err:
            log((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""))
            status = f"timeout after {timeout:.0f} s"
        entry = {"status": status, "wall_s": time.monotonic() - t0, "command": command[1:]}
        if json_path.exists():
            entry["result"] = json.loads(json_path.read_text())
            json_path.unlink()
        results[name] = entry
        log(f"== {name}: {status} in {entry['wall_s']:.0f} s")
    return results


def _mib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "### Training iteration (phase sim: after the regression warm-up; warmup: during it)",
        "",
        "| job | phase | device | ms/iter | samples/s | TFLOP/s | MFU | overhead | peak memory |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results.items():
        r = entry.get("result")
        if not name.startswith(("train", "memory")):
            continue
        if r is None:
            lines.append(f"| {name} | | {entry['status']} | | | | | | |")
            continue
        mem = r["memory"].get("peak_allocated_bytes", r["memory"].get("peak_rss_bytes", 0))
        for phase, p in r["phases"].items():
            mfu = f"{100 * p['mfu']:.1f}%" if p.get("mfu") else "n/a"
            over = p["overhead_ratio"]
            over = f"{over:.3f}" if over == over else "-"  # NaN for --iteration_only jobs
            lines.append(
                f"| {name} | {phase} | {r['device']} | {p['ms_per_iteration']:.1f} | {p['samples_per_s']:.2f} | "
                f"{p['achieved_tflops']:.3g} | {mfu} | {over} | {_mib(mem)} |"
            )
    for name, entry in results.items():
        r = entry.get("result")
        if not (name.startswith("train") and r):
            continue
        for phase, p in r["phases"].items():
            if not p["passes_ms"]:
                continue
            lines += [
                "",
                f"#### {name}, phase {phase}: passes alone (ms) and in-loop segments (ms)",
                "",
                "| pass | ms | | segment | ms |",
                "|---|---:|---|---|---:|",
            ]
            passes, segments = list(p["passes_ms"].items()), list(p["segments_ms"].items())
            for i in range(max(len(passes), len(segments))):
                a = passes[i] if i < len(passes) else ("", None)
                b = segments[i] if i < len(segments) else ("", None)
                left = "" if a[1] is None else f"{a[1]:.1f}"
                right = "" if b[1] is None else f"{b[1]:.1f}"
                lines.append(f"| {a[0]} | {left} | | {b[0]} | {right} |")
        for k, v in r["ablations_ms"].items():
            lines.append(f"| ablation: {k} | {v:.1f} | | | |")
    lines += [
        "",
        "### Memory plan against the measurement (sim_diffusers.training.memory; peaks comparable for iteration-only "
        "jobs)",
        "",
        "| job | plan peak (moment) | measured peak | plan / measured | activations plan / measured | static |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, entry in results.items():
        r = entry.get("result")
        if not (name.startswith(("train", "memory")) and r and "plan" in r["memory"]):
            continue
        plan, mem = r["memory"]["plan"], r["memory"]
        measured = _mib(mem["peak_allocated_bytes"]) if "peak_allocated_bytes" in mem else "n/a (CPU)"
        ratio = f"{plan['peak_ratio']:.3f}" if "peak_ratio" in plan else "-"
        if not r["args"]["iteration_only"]:
            ratio += " (isolated passes too)"
        static = "exact" if plan["static_exact"] else f"x{plan['static_ratio']:.3f}"
        lines.append(
            f"| {name} | {_mib(plan['plan_peak_bytes'])} ({plan['plan_peak_moment']}) | {measured} | {ratio} | "
            f"{plan['activation_ratio']:.3f} | {static} |"
        )
    lines += [
        "",
        "### Inference",
        "",
        "| job | pipeline | steps | batch | latency ms | img/s | T5 ms | transformer ms | VAE ms | other ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results.items():
        if not name.startswith("inference"):
            continue
        r = entry.get("result")
        if r is None:
            lines.append(f"| {name} | {entry['status']} | | | | | | | | |")
            continue
        for x in r["rows"]:
            b = x["breakdown_ms"]
            lines.append(
                f"| {name} | {x['pipeline']} | {x['steps']} | {x['batch_size']} | {x['latency_ms']:.1f} | "
                f"{x['images_per_s']:.2f} | {b['text_encoder']:.1f} | {b['transformer']:.1f} | "
                f"{b['vae_decode']:.1f} | {b['other']:.1f} |"
            )
    skipped = [f"{k} ({v['status']})" for k, v in results.items() if v["status"] != "ok"]
    if skipped:
        lines += ["", "Not completed: " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.prepare:
        prepare()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "gpu_check.log").open("w")

    def log(text):
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    t0 = time.monotonic()
    if shutil.which("nvidia-smi") and not args.smoke:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm", "--format=csv"],
            capture_output=True,
            text=True,
            check=False,
        )
        log(smi.stdout)
    jobs = SMOKE_JOBS if args.smoke else GPU_JOBS
    if args.only:
        jobs = [j for j in jobs if j[0] in args.only]
    results = run_jobs(jobs, out, args.budget_s, log)
    kind = "smoke, " if args.smoke else ""
    header = f"## GPU check ({kind}{time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - t0:.0f} s)"
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, header)
    (out / "gpu_results.md").write_text(table)
    log(table)
    log_file.close()
    return 0 if all(v["status"] in ("ok", "skipped") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
