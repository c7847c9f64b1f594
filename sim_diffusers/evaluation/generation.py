"""Which models to compare and how to sample them: model specs, pipeline loading, seeded batched generation."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from ..teachers import class_name_of

SIM_PIPELINE = "SIMOneStepPipeline"
# The SIM paper's teacher row: PixArt-alpha with 30 sampling steps; 4.5 is PixArt-alpha's default guidance scale.
TEACHER_STEPS = 30
TEACHER_GUIDANCE_SCALE = 4.5


@dataclass
class ModelSpec:
    """One model column of the comparison, written `[LABEL=]PATH[:STEPS[:GUIDANCE]]` on the command line."""

    path: str
    label: str
    steps: int | None = None
    guidance_scale: float | None = None
    pipeline: str | None = None  # class name, filled in by `resolve`

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label, sep, rest = text.partition("=")
        if not sep:
            label, rest = "", text
        path, *numbers = rest.split(":")
        if len(numbers) > 2 or not path:
            raise ValueError(f"Model spec {text!r}: expected [LABEL=]PATH[:STEPS[:GUIDANCE]].")
        try:
            steps = int(numbers[0]) if numbers and numbers[0] else None
            guidance_scale = float(numbers[1]) if len(numbers) > 1 else None
        except ValueError:
            raise ValueError(f"Model spec {text!r}: STEPS must be an integer and GUIDANCE a number.") from None
        return cls(
            path=path,
            label=label or os.path.basename(os.path.normpath(path)),
            steps=steps,
            guidance_scale=guidance_scale,
        )

    def resolve(self) -> ModelSpec:
        """Fill in the pipeline class and its sampling defaults; a one-step model takes neither steps nor guidance."""
        self.pipeline = pipeline_class_name(self.path)
        if self.pipeline == SIM_PIPELINE:
            if self.steps not in (None, 1) or self.guidance_scale is not None:
                raise ValueError(
                    f"{self.label}: a SIM one-step model samples in 1 step without classifier-free guidance (it was "
                    f"distilled from the guided teacher); drop ':{self.steps}:{self.guidance_scale}' from its spec."
                )
            self.steps = 1
        else:
            self.steps = TEACHER_STEPS if self.steps is None else self.steps
            self.guidance_scale = TEACHER_GUIDANCE_SCALE if self.guidance_scale is None else self.guidance_scale
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def pipeline_class_name(path: str) -> str:
    """`_class_name` from the model_index.json of a pipeline folder or Hub repository."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        from huggingface_hub import hf_hub_download

        index_file = hf_hub_download(path, "model_index.json")
    with open(index_file, encoding="utf-8") as f:
        return class_name_of(json.load(f))


def load_pipeline(spec: ModelSpec, device="cpu", dtype=torch.float32):
    """SIMOneStepPipeline when model_index.json says so, the teacher's own PixArtAlphaPipeline or PixArtSigmaPipeline
    otherwise."""
    if spec.pipeline == SIM_PIPELINE:
        from sim_diffusers import SIMOneStepPipeline

        pipe = SIMOneStepPipeline.from_pretrained(spec.path, dtype=dtype)
    else:
        from sim_diffusers.teachers import load_teacher_pipeline

        pipe = load_teacher_pipeline(spec.path, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the caller shows one bar over all batches
    return pipe


def generate(pipe, spec: ModelSpec, prompts, seeds, height=None, width=None, resolution_binning=True):
    """PIL images for `prompts`, image i drawn from its own CPU generator seeded with `seeds[i]`, so that a sample
    does not depend on the batch size, on the device, or on which model is sampled."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    kwargs = dict(
        prompt=list(prompts),
        generator=generators,
        height=height,
        width=width,
        use_resolution_binning=resolution_binning,
        output_type="pil",
    )
    if spec.pipeline != SIM_PIPELINE:
        kwargs.update(num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale)
    return pipe(**kwargs).images


def default_captions_file() -> str:
    return str(resources.files("sim_diffusers").joinpath("data", "eval_captions.txt"))


def read_captions(path: str | None = None) -> list[str]:
    """One caption per line; blank lines are skipped."""
    with open(path or default_captions_file(), encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise ValueError(f"No captions in {path}.")
    return captions


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
