"""The teacher families a SIM generator is distilled from, told apart by the `_class_name` of their model_index.json.

PixArt-alpha and PixArt-Σ share the transformer class (PixArtTransformer2DModel), the T5-v1.1-XXL text encoder and
the noise schedule (1000 linear-beta steps). They differ in their pipeline class and prompt length:

    family        pipeline             T5 tokens   VAE (scaling factor)   checkpoints
    PixArt-alpha  PixArtAlphaPipeline  120         SD VAE (0.18215)       256, 512, 1024 px
    PixArt-Σ      PixArtSigmaPipeline  300         SDXL VAE (0.13025)     256, 512, 1024, 2048 px

The VAE and its scaling factor come with the teacher's own components, and the resolution bins follow the
transformer's sample_size, so the family decides only the pipeline class that loads a teacher and its token length.

Only the standard library is imported at module level, so the trainer's argument checks can read a teacher's family
without loading diffusers. Every saved SIM model folder carries a copy of this file next to the pipeline module that
imports it (see `pipeline_sim_one_step.py`), so it must not import anything from sim_diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The Hub and cache options of `from_pretrained` that also apply to reading a model_index.json.
_CONFIG_LOADING_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")


@dataclass(frozen=True)
class TeacherFamily:
    name: str  # as the PixArt authors write it, for messages and model cards
    pipeline_class: str  # the diffusers pipeline that loads and samples the teacher
    max_sequence_length: int  # T5 tokens per prompt, as the family's pipeline pads them
    hub_tag: str  # model-card tag


PIXART_ALPHA = TeacherFamily("PixArt-alpha", "PixArtAlphaPipeline", 120, "pixart-alpha")
PIXART_SIGMA = TeacherFamily("PixArt-Σ", "PixArtSigmaPipeline", 300, "pixart-sigma")
TEACHER_FAMILIES = (PIXART_ALPHA, PIXART_SIGMA)


def class_name_of(model_index: dict) -> str | None:
    """The pipeline class a model_index.json names; a folder carrying its own code names it as [module, class]."""
    name = model_index.get("_class_name")
    if isinstance(name, (list, tuple)):
        return name[-1]
    return name


def family_named(name: str) -> TeacherFamily:
    for family in TEACHER_FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"Unknown teacher family {name!r}; known: {', '.join(f.name for f in TEACHER_FAMILIES)}.")


def family_of_model_index(model_index: dict) -> TeacherFamily | None:
    """The family of a teacher from its model_index.json, or None for any other pipeline."""
    class_name = class_name_of(model_index)
    for family in TEACHER_FAMILIES:
        if family.pipeline_class == class_name:
            return family
    return None


def family_of_pipeline(pipeline) -> TeacherFamily | None:
    """The family of a loaded pipeline (subclasses included), or None for any other pipeline."""
    import diffusers

    for family in TEACHER_FAMILIES:
        if isinstance(pipeline, getattr(diffusers, family.pipeline_class)):
            return family
    return None


def load_teacher_pipeline(pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """The teacher as its own family's pipeline: PixArtAlphaPipeline or PixArtSigmaPipeline, chosen by the
    `_class_name` of its model_index.json (a Hub id or a local folder).

    kwargs go to that pipeline's `from_pretrained` (`dtype`, `revision`, `variant`, `text_encoder=None`, ...).
    """
    import diffusers

    config_kwargs = {k: kwargs[k] for k in _CONFIG_LOADING_KWARGS if k in kwargs}
    model_index = diffusers.DiffusionPipeline.load_config(pretrained_model_name_or_path, **config_kwargs)
    family = family_of_model_index(model_index)
    if family is None:
        name = class_name_of(model_index)
        raise ValueError(f"{pretrained_model_name_or_path} is a {name}, not a PixArt-alpha or PixArt-Σ pipeline.")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    return pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
