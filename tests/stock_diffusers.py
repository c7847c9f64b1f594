"""Run a saved SIM folder the way a user who has only diffusers does: `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` in a fresh process where `sim_diffusers` cannot be imported (the shared venv has it
installed, so the process refuses the import itself), with its own diffusers module cache."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SCRIPT = r"""
import importlib.abc, json, sys


class NoSimDiffusers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sim_diffusers":
            raise ModuleNotFoundError(f"No module named {name!r} (this process has stock diffusers only)")
        return None


sys.meta_path.insert(0, NoSimDiffusers())

import os

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
folder, inputs_file, prompts_json, resave, out_file = sys.argv[1:]
prompts = json.loads(prompts_json)
z = load_file(inputs_file)["z"]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
if resave != "-":  # a pipeline loaded this way saves a folder that loads the same way
    pipe.save_pretrained(resave)
    pipe = DiffusionPipeline.from_pretrained(resave, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
outputs = {
    "latent": pipe(prompts, latents=z, output_type="latent").images,
    "pt": pipe(prompts, latents=z, output_type="pt", use_resolution_binning=False).images,
}
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "sim_diffusers")
assert not leaked, leaked
described = {"module": type(pipe).__module__, "class": type(pipe).__name__, "config": dict(pipe.config)}
print(json.dumps(described, default=str))
save_file({k: v.contiguous() for k, v in outputs.items()}, out_file)
"""


def generate_with_stock_diffusers(folder, prompts, z, work_dir, resave=None):
    """Outputs {"latent", "pt"} of the folder's pipeline for `prompts` from noise `z`, and what the process reported
    (the class's module, its name and config)."""
    import json

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_file({"z": z.contiguous()}, str(work_dir / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The same number of threads as this process, so that both run the same CPU kernels.
    threads = str(torch.get_num_threads())
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(work_dir / "modules"),
        OMP_NUM_THREADS=threads,
    )
    args = [
        str(folder),
        str(work_dir / "inputs.safetensors"),
        json.dumps(prompts),
        str(resave or "-"),
        str(work_dir / "out.safetensors"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *args], cwd=work_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return load_file(str(work_dir / "out.safetensors")), report
