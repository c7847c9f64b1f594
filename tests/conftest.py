import os

import pytest
import torch

# Tests never reach the Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory):
    """A tiny PixArt-alpha pipeline folder shaped like PixArt-XL-2-512x512 (no micro-conditions)."""
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("tiny_pixart") / "teacher", seed=0)


@pytest.fixture(scope="session")
def tiny_ms_teacher_path(tmp_path_factory):
    """A tiny PixArt-alpha pipeline folder shaped like PixArt-XL-2-1024-MS (resolution/aspect-ratio conditioned)."""
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("tiny_pixart_ms") / "teacher", seed=1, micro_conditions=True)
