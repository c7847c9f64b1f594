"""Packaging for sim_diffusers: one-step distillation of PixArt-alpha with Score Implicit Matching."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is listed without an upper bound; on a machine without a GPU install the CPU build first
# (`pip install torch==2.13.0` here, or the CPU index elsewhere) so that pip does not pull a CUDA build.
install_requires = [
    "torch>=2.4",
    "diffusers>=0.42",
    "transformers>=5",
    "safetensors>=0.4",
    "huggingface_hub>=0.34",
    "sentencepiece>=0.2",
    # PixArt-alpha cleans captions with these by default; the trainer and the pipeline must clean identically.
    "beautifulsoup4",
    "ftfy",
    "numpy",
    "Pillow",
    "tqdm",
]

extras = {
    "train": ["accelerate>=1.0", "datasets>=3.0", "peft>=0.17", "tensorboard"],
    "xformers": ["xformers"],
    "eval": ["torchmetrics>=1.4", "scipy"],
    # ruff is pinned: `ruff format --check` must give the same verdict everywhere.
    "test": ["pytest>=8", "ruff==0.17.6"],
}
extras["dev"] = sorted({dep for group in ("train", "eval", "test") for dep in extras[group]})

setup(
    name="sim_diffusers",
    version="0.1.0",
    description="Distil PixArt-alpha into a one-step generator with Score Implicit Matching, on diffusers.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["sim_diffusers", "sim_diffusers.*"]),
    package_data={"sim_diffusers": ["data/*.txt"]},
    install_requires=install_requires,
    extras_require=extras,
)
