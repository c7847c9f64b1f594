"""examples/generate.py end to end on the tiny fixture."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sim_diffusers import SIMOneStepPipeline

REPO = Path(__file__).resolve().parents[1]


def test_generate_writes_one_reproducible_png_per_prompt(tiny_teacher_path, tmp_path):
    SIMOneStepPipeline.from_teacher(tiny_teacher_path).save_pretrained(tmp_path / "sim")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\nA blue dog!\n", encoding="utf-8")
    cmd = [
        sys.executable,
        str(REPO / "examples" / "generate.py"),
        "--model",
        str(tmp_path / "sim"),
        "a green bird",
        "--prompt_file",
        str(prompts),
        "--batch_size",
        "2",
        "--no_resolution_binning",
    ]
    subprocess.run(cmd + ["--output_dir", str(tmp_path / "a")], check=True, capture_output=True)
    files = sorted((tmp_path / "a").glob("*.png"))
    assert [f.name for f in files] == ["00000-a-green-bird.png", "00001-a-red-cat.png", "00002-a-blue-dog.png"]
    assert Image.open(files[0]).size == (64, 64)
    # Same seed, different batching: the same images (per-image generators), up to one 8-bit level of float noise.
    subprocess.run(
        cmd[:-3] + ["--batch_size", "1", "--no_resolution_binning", "--output_dir", str(tmp_path / "b")],
        check=True,
        capture_output=True,
    )
    for f in files:
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (f, tmp_path / "b" / f.name))
        assert np.abs(a - b).max() <= 1


def test_generate_without_prompts_fails_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "generate.py"), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "at least one prompt" in result.stderr and "Traceback" not in result.stderr
