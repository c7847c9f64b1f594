"""Validation against the teacher from fixed noises: is the run working, without any ground truth?

SIM's generator loss is a surrogate whose value means nothing, so the trainer measures what a practitioner cares
about directly. For each validation prompt c, N fixed noises z_1..z_N (deterministic from --seed, apart from the
training noise); the teacher's K-step ODE samples y_i = T(z_i, c) (the guided teacher the generator is distilled
from, `step.teacher_ode_targets`; computed once per run and cached in OUTPUT_DIR/logs as safetensors, reused on
resume); at every validation the generator's samples x_i = G(z_i, c) (`generator.few_step_generate`), and per prompt
(`sim_diffusers.diversity`):

    diversity ratio      spread of the x_i over spread of the y_i (mean pairwise latent distance): 1 is the
                         teacher's diversity; near 0, the generator sends every noise to one look (mode collapse)
    teacher agreement    mean |x_i - y_i| over the teacher's spread: 0 is the teacher's own sample from each noise,
                         1 as far from it as an unrelated teacher sample (the regression term on held-out noises)

A minimum diversity ratio below --validation_collapse_threshold prints a warning (and with
--validation_collapse_action stop, the trainer saves a checkpoint and exits with COLLAPSE_EXIT_CODE). The defaults
(N, the threshold) come from the ground-truth benchmark, where the true mode coverage is known (docs/training.md,
"Is my run working?").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..diversity import prompt_statistics
from ..generator import few_step_generate, micro_conditions
from .step import Conditioning, teacher_ode_targets

logger = logging.getLogger(__name__)

TEACHER_SAMPLES_FILE = Path("logs") / "validation_teacher_samples.safetensors"
VALIDATION_LOG_FILE = Path("logs") / "validation.jsonl"
COLLAPSE_EXIT_CODE = 4
COLLAPSE_ACTIONS = ("warn", "stop")
# Mixed into the seed of the validation noise, so that it is never a noise the generator trained on (the training
# stream seeds sample i with (seed, i)).
NOISE_STREAM = 0x7A11D
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ValidationConfig:
    """The validation's settings (the trainer's options --validation_num_samples, --validation_teacher_steps,
    --validation_collapse_threshold, --validation_collapse_action)."""

    num_samples: int = 32
    teacher_steps: int = 20
    collapse_threshold: float = 0.5
    collapse_action: str = "warn"

    @classmethod
    def from_namespace(cls, args) -> ValidationConfig:
        return cls(
            num_samples=args.validation_num_samples,
            teacher_steps=args.validation_teacher_steps,
            collapse_threshold=args.validation_collapse_threshold,
            collapse_action=args.validation_collapse_action,
        )


@dataclass
class ValidationSet:
    """The validation prompts with their text conditioning, (P, L, D) embeddings and masks, and the empty prompt's
    (the negative of classifier-free guidance), computed once so that validation never needs T5; then, prepared on
    first use (`prepare`), the fixed noises and the teacher's samples from them."""

    prompts: list[str]
    embeds: torch.Tensor
    mask: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    noise: torch.Tensor | None = None  # (P, N, C, h, w)
    teacher_latents: torch.Tensor | None = None  # (P, N, C, h, w), float32 on the CPU
    teacher_images: np.ndarray | None = None  # the grid's decoded teacher samples, once per run

    def conditioning(self, index: int, n: int, added_cond_kwargs=None, device=None) -> Conditioning:
        """Prompt `index`'s conditioning repeated for n samples."""

        def rows(t, i):
            return t[i : i + 1].expand(n, *t.shape[1:]).to(device)

        return Conditioning(
            rows(self.embeds, index),
            rows(self.mask, index),
            rows(self.negative_embeds, 0),
            rows(self.negative_mask, 0),
            added_cond_kwargs,
        )

    def prepare_noise(self, config: ValidationConfig, latent_shape, seed: int) -> None:
        if self.noise is None:
            self.noise = validation_noise(seed, len(self.prompts), config.num_samples, latent_shape)

    def prepare(
        self, config: ValidationConfig, latent_shape, seed: int, settings: dict, path: Path, compute, write=True
    ):
        """The noises, and the teacher's samples: loaded from `path` when it holds them for these `settings` (all
        the samples depend on besides prompts, N, K, seed and shape: teacher, text settings, guidance, dtype), else
        `compute(noise)` and cached there (by the process that `write`s). Returns the seconds spent computing (None
        when nothing was computed)."""
        if self.teacher_latents is not None:
            return None
        self.prepare_noise(config, latent_shape, seed)
        fingerprint = reference_fingerprint(
            {
                **settings,
                "prompts": list(self.prompts),
                "num_samples": config.num_samples,
                "teacher_steps": config.teacher_steps,
                "seed": seed,
                "latent_shape": list(latent_shape),
            }
        )
        self.teacher_latents = load_teacher_samples(path, fingerprint)
        if self.teacher_latents is not None:
            logger.info("Validation: reusing the teacher's samples cached in %s", path.name)
            return None
        tic = time.perf_counter()
        self.teacher_latents = compute(self.noise)
        seconds = time.perf_counter() - tic
        if write:
            save_teacher_samples(path, self.teacher_latents, fingerprint)
        logger.info("Validation: the teacher's samples took %.1f s; cached in %s", seconds, path.name)
        return seconds


def validation_noise(seed: int, num_prompts: int, num_samples: int, latent_shape) -> torch.Tensor:
    """z ~ N(0, I), (P, N, C, h, w): prompt p's noises from a CPU generator seeded by (seed, NOISE_STREAM, p), drawn
    one at a time, so the first n of N noises do not depend on N."""
    noise = torch.empty(num_prompts, num_samples, *latent_shape)
    for p in range(num_prompts):
        state = np.random.SeedSequence([seed, NOISE_STREAM, p]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        for i in range(num_samples):
            noise[p, i] = torch.randn(tuple(latent_shape), generator=g)
    return noise


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's samples: computed once per run, cached, reused on resume


def reference_fingerprint(settings: dict) -> str:
    """A digest of everything the teacher's validation samples depend on (no path or setting is stored in clear)."""
    return hashlib.sha256(
        json.dumps({**settings, "version": CACHE_FORMAT_VERSION}, sort_keys=True).encode()
    ).hexdigest()


def load_teacher_samples(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The cached teacher samples, or None when there are none or they belong to other settings."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return f.get_tensor("teacher_samples")
    except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed, never trusted
        return None


def save_teacher_samples(path: Path, samples: torch.Tensor, fingerprint: str) -> None:
    """Written next to its final name and renamed, so an interrupted write never leaves a half file to reuse."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({"teacher_samples": samples.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


@torch.no_grad()
def teacher_samples(networks, ode_scheduler, noise, validation: ValidationSet, guidance_scale, steps, added, device):
    """y = T(z, c): the guided teacher's `steps`-step ODE solution from each validation noise, (P, N, C, h, w),
    float32 on the CPU; one prompt per batch."""
    out = []
    for p in range(len(validation.prompts)):
        z = noise[p].to(device)
        cond = validation.conditioning(p, len(z), added(len(z)), device)
        out.append(teacher_ode_targets(networks, ode_scheduler, z, cond, guidance_scale, steps).float().cpu())
    return torch.stack(out)


def step_noise(seed: int, prompt: int, step: int, shape) -> torch.Tensor:
    """The fresh noise a K-step generator adds before call `step` (1 .. K-1) for prompt `prompt`'s N samples: fixed by
    (seed, NOISE_STREAM, prompt, step), like the noises themselves, so every validation sees the same draws."""
    state = np.random.SeedSequence([seed, NOISE_STREAM, prompt, step]).generate_state(1)[0]
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state)))


@torch.no_grad()
def generator_samples(generator, noise, validation: ValidationSet, timesteps, alphas_cumprod, added, device, seed=0):
    """x = G(z, c) for each validation noise, (P, N, C, h, w), float32 on the CPU; one prompt per batch. A K-step
    generator (`timesteps`, len K) re-noises with `step_noise` between its calls."""
    out = []
    for p in range(len(validation.prompts)):
        z = noise[p].to(device)
        cond = validation.conditioning(p, len(z), added(len(z)), device)
        x0 = few_step_generate(
            generator,
            z.to(generator.dtype),
            list(timesteps),
            alphas_cumprod,
            cond.prompt_embeds.to(generator.dtype),
            cond.prompt_attention_mask,
            cond.added_cond_kwargs,
            fresh_noise=lambda k, p=p, z=z: step_noise(seed, p, k, z.shape).to(device, generator.dtype),
        )
        out.append(x0.float().cpu())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# One validation's values and how they are shown


@dataclass
class ValidationResult:
    """The statistics of one validation: per prompt (`diversity.prompt_statistics`), the minimum diversity ratio, the
    mean agreement, and the prompts below the collapse threshold."""

    step: int
    per_prompt: dict[str, dict[str, float]]
    threshold: float
    seconds: float = 0.0
    teacher_seconds: float | None = None  # set when the teacher's samples were computed at this validation
    grid: np.ndarray | None = None  # the side-by-side image grid (uint8, H x W x 3)
    collapsed: list[str] = field(init=False)

    def __post_init__(self):
        # Step 0 is the untrained generator, the teacher's posterior mean at t* (a blur of the teacher's samples, so
        # less spread): the baseline of the curves, never a collapse.
        below = [p for p, s in self.per_prompt.items() if s["diversity_ratio"] < self.threshold]
        self.collapsed = below if self.step > 0 else []

    @property
    def diversity_ratio_min(self) -> float:
        return min(s["diversity_ratio"] for s in self.per_prompt.values())

    @property
    def teacher_agreement(self) -> float:
        return float(np.mean([s["teacher_agreement"] for s in self.per_prompt.values()]))

    def scalars(self) -> dict[str, float]:
        """Tracker scalars: per prompt, the minimum ratio over prompts and the mean agreement."""
        logs = {
            "validation/diversity_ratio_min": self.diversity_ratio_min,
            "validation/teacher_agreement": self.teacher_agreement,
        }
        for prompt, s in self.per_prompt.items():
            tag = tracker_tag(prompt)
            logs[f"validation/diversity_ratio/{tag}"] = s["diversity_ratio"]
            logs[f"validation/teacher_agreement/{tag}"] = s["teacher_agreement"]
        return logs

    def record(self) -> dict:
        """This validation as one line of OUTPUT_DIR/logs/validation.jsonl (the step is added by the writer)."""
        record = {
            "diversity_ratio_min": self.diversity_ratio_min,
            "teacher_agreement": self.teacher_agreement,
            "collapse_threshold": self.threshold,
            "possible_collapse": self.collapsed,
            "seconds": round(self.seconds, 4),
            "prompts": self.per_prompt,
        }
        if self.teacher_seconds is not None:
            record["teacher_seconds"] = round(self.teacher_seconds, 4)
        return record

    def postfix(self) -> dict[str, str]:
        """The progress bar's view: the least diverse prompt's ratio and the mean agreement."""
        return {"diversity": f"{self.diversity_ratio_min:.2f}", "agreement": f"{self.teacher_agreement:.2f}"}

    def warnings(self) -> list[str]:
        return [
            f'warning: possible mode collapse at step {self.step}: "{prompt}" has '
            f"{self.per_prompt[prompt]['diversity_ratio']:.2f} of the teacher's diversity"
            for prompt in self.collapsed
        ]


def tracker_tag(prompt: str) -> str:
    """A prompt as one level of a tracker's tag (a slash would open a sub-group)."""
    return prompt.replace("/", "|").strip() or "(empty)"


def statistics(step, generator_latents, teacher_latents, prompts, threshold) -> ValidationResult:
    per_prompt = {
        prompt: prompt_statistics(generator_latents[p], teacher_latents[p]) for p, prompt in enumerate(prompts)
    }
    return ValidationResult(step, per_prompt, threshold)


def read_validation_log(output_dir) -> list[dict]:
    """Every validation of a run, as written (one dict per line of logs/validation.jsonl)."""
    path = Path(output_dir) / VALIDATION_LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_validation(output_dir) -> dict | None:
    records = read_validation_log(output_dir)
    return records[-1] if records else None


def added_cond_factory(generator, resolution, device, dtype):
    """n -> the micro-conditions of n validation samples at the teacher's native resolution."""
    return lambda n: micro_conditions(generator, n, resolution, resolution, device, dtype)
