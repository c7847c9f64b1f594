"""Fixtures of the research tests: the quick world and a small teacher of it, built once per session in a temporary
cache (never the user's)."""

import os

import pytest
import torch

from sim_diffusers.ground_truth import GaussianMixtureWorld, TeacherConfig, load_or_build_teacher

# Tests never reach the Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world():
    return GaussianMixtureWorld.quick()


@pytest.fixture(scope="session")
def quick_teacher(tmp_path_factory, world):
    """(teacher folder, its TeacherConfig): 2 layers, 100 steps, enough for the instruments to run on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, above all on a shared machine
    try:
        config = TeacherConfig.quick(num_layers=2, train_steps=100, batch_size=32, warmup_steps=20)
        path = load_or_build_teacher(world, config, cache_dir=tmp_path_factory.mktemp("ground_truth"))
    finally:
        torch.set_num_threads(threads)
    return path, config
