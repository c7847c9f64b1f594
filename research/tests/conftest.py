"""Fixtures of the research tests: the quick world and a small teacher of it, built once per session in a temporary
cache (never the user's)."""

import os

import pytest
import torch

from sim_diffusers.ground_truth import GaussianMixtureWorld

# Tests never reach the Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world():
    return GaussianMixtureWorld.quick()


@pytest.fixture(scope="session")
def quick_teacher(tmp_path_factory):
    """(teacher folder, its TeacherConfig) of the quick world, in a temporary cache (never the user's)."""
    from sim_diffusers.testing import small_quick_world_teacher

    return small_quick_world_teacher(tmp_path_factory.mktemp("ground_truth"))
