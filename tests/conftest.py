"""Fixtures and helpers shared by the test modules: the tiny PixArt teachers, and running the trainer."""

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
TRAINER_SCRIPT = REPO / "training_scripts" / "train_sim_pixart.py"
# One thread: runs that should agree agree to float precision whatever the machine's core count; a closed port as
# the Hub's address, should offline mode ever be ignored.
TRAINER_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
}
TRAINER_TIMEOUT_S = 600


def run_trainer(teacher, captions, output_dir, *args, processes=None, faults="", check=True, env=None):
    """train_sim_pixart.py on `teacher` and `captions` into `output_dir`: as a plain script (processes=None) or under
    `accelerate launch` with that many processes (gloo on CPU). `faults`: SIM_DIFFUSERS_TEST_FAULTS. With check, a
    non-zero exit fails the test with the trainer's stderr. The result carries `.listing`, output_dir's names."""
    argv = [
        "--pretrained_model_name_or_path",
        str(teacher),
        "--caption_file",
        str(captions),
        "--output_dir",
        str(output_dir),
        *args,
    ]
    if processes is None:
        cmd = [sys.executable, str(TRAINER_SCRIPT), *argv]
    else:
        launch = [
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if processes > 1:
            launch = ["--multi_gpu", "--main_process_port", str(free_port()), *launch]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(TRAINER_SCRIPT), *argv]
    run_env = {**TRAINER_ENV, "SIM_DIFFUSERS_TEST_FAULTS": faults, **(env or {})}
    result = run_process_group(cmd, run_env)
    if check:
        assert result.returncode == 0, describe(result)
    result.listing = sorted(p.name for p in Path(output_dir).iterdir()) if Path(output_dir).is_dir() else []
    return result


def free_port() -> int:
    """A TCP port nobody listens on now: each launch gets its own, so one that hangs cannot block the next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process_group(cmd: list[str], env: dict, timeout: float = TRAINER_TIMEOUT_S) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own (`run_process_groups` with one command)."""
    return run_process_groups([cmd], env, timeout)[0]


def run_process_groups(cmds: list[list[str]], env: dict, timeout: float = TRAINER_TIMEOUT_S):
    """Commands that run at once (launchers of one job), each in a session of its own; if one outlives `timeout`
    every group is killed (a launcher killed alone leaves its ranks running, holding their port), and the results say
    so with exit code -9."""
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        for cmd in cmds
    ]
    outputs, timed_out = [], False
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:  # a launcher that ended may have left ranks in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            outputs.append(proc.communicate())
    results = []
    for cmd, proc, (stdout, stderr) in zip(cmds, procs, outputs):
        if timed_out:
            stderr += f"\n[test harness] timed out after {timeout} s; the process groups were killed"
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def describe(result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def load_trainer_module(name="train_sim_pixart_under_test"):
    """The training script as a module, for in-process runs (`parse_args`, `main`)."""
    spec = importlib.util.spec_from_file_location(name, TRAINER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def component_weights(folder, component="transformer"):
    """The safetensors state dict of a diffusers component folder (a pipeline's transformer, a checkpoint's
    generator, ...)."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / component / "diffusion_pytorch_model.safetensors"))


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def perturb(module, seed, scale=0.05):
    """Random, non-trivial weights, so that equivalence is checked away from initialisation symmetries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def write_captions(path, captions) -> Path:
    path = Path(path)
    path.write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory):
    """A tiny PixArt-alpha pipeline folder shaped like PixArt-XL-2-512x512 (no micro-conditions)."""
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("tiny_pixart") / "teacher", seed=0)


@pytest.fixture(scope="session")
def tiny_ms_teacher_path(tmp_path_factory):
    """A tiny PixArt-alpha pipeline folder shaped like PixArt-XL-2-1024-MS (resolution/aspect-ratio conditioned)."""
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    return build_tiny_pixart_pipeline(
        tmp_path_factory.mktemp("tiny_pixart_ms") / "teacher", seed=1, micro_conditions=True
    )
