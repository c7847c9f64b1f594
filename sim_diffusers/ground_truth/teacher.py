"""The teacher of a `GaussianMixtureWorld`: a real tiny PixArt-alpha pipeline regressed on the exact epsilon, built
once and cached in a user cache directory by a hash of the world and its training settings.

The cache lives in `default_cache_dir()`: $SIM_DIFFUSERS_CACHE/ground_truth if that variable is set, else
$XDG_CACHE_HOME/sim_diffusers/ground_truth, else ~/.cache/sim_diffusers/ground_truth; every function here also takes
an explicit `cache_dir`. diffusers is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..schedule import diffuse
from .world import GaussianMixtureWorld

WORLD_FILE = "ground_truth.json"
CACHE_ENV = "SIM_DIFFUSERS_CACHE"
# Bump when the teacher training code changes in a way that changes its weights: it is part of the cache key.
TEACHER_BUILD_VERSION = 1


def default_cache_dir() -> Path:
    """Where teachers are cached unless a `cache_dir` is given; read at every call, so the environment decides."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sim_diffusers"
    return root.expanduser() / "ground_truth"


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture and training settings of the tiny PixArt teacher (tokenizer, T5 and VAE: the tiny fixture's).

    Training: x0 ~ world, t ~ U{0..999}, x_t = alpha_t x0 + sigma_t eps (`schedule.diffuse`), loss
    |eps_theta(x_t, t, c) - eps*(x_t, t, c)|^2 (regression on the exact epsilon: no sampling noise in the target);
    with probability `uncond_prob` the caption is replaced by the empty prompt "" and the target by the unconditional
    eps*, so that classifier-free guidance works. AdamW with linear warmup and cosine decay to zero.
    """

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    train_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 6e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    uncond_prob: float = 0.1
    seed: int = 0
    patch_size: int | None = None  # None: the fixture's 2

    @classmethod
    def for_world(cls, world: GaussianMixtureWorld, **overrides) -> TeacherConfig:
        """The default teacher for a world of `GaussianMixtureWorld.at_latent_side`: the default architecture at the
        fixture's patch 2, so that every token carries the same 16 latent elements and the teacher learns the larger
        worlds as well as the default one; the number of tokens grows with the latent (16, 64, 256, 1024 at sides
        8 .. 64), and with it the cost. Growing the patch instead (`patch_size=side // 4`, 16 tokens at every
        size) keeps the cost but not the difficulty: a token of 4 x p x p elements through a width of 128 cannot
        carry the per-element part of eps*, and the teachers at sides 32 and 64 did not learn (relative eps error
        0.51 and 0.88, against 0.0003 at side 8; docs/ground_truth.md)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> TeacherConfig:
        """A teacher of `GaussianMixtureWorld.quick()` (4 tokens) that trains in about a minute on one core."""
        params = dict(num_layers=3, train_steps=600, warmup_steps=60)
        params.update(overrides)
        return cls(**params)

    def transformer_overrides(self, world: GaussianMixtureWorld) -> dict:
        width = self.num_attention_heads * self.attention_head_dim
        channels, size, _ = world.latent_shape
        return dict(
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            cross_attention_dim=width,
            in_channels=channels,
            out_channels=2 * channels,
            sample_size=size,
            **({} if self.patch_size is None else {"patch_size": self.patch_size}),
        )


def teacher_cache_key(world: GaussianMixtureWorld, config: TeacherConfig) -> str:
    # Fields left at None are omitted, so that configs from before such a field keep their cached teachers.
    teacher = {k: v for k, v in asdict(config).items() if v is not None}
    payload = {"world": world.to_dict(), "teacher": teacher, "version": TEACHER_BUILD_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def encode_world_captions(pipe, world: GaussianMixtureWorld):
    """T5 embeddings of every caption and of the empty negative prompt, exactly as PixArtAlphaPipeline.__call__ makes
    them (clean_caption=True, 120 tokens). Returns (embeds (n_captions, L, D), mask, empty_embeds (1, L, D), mask)."""
    device = pipe.transformer.device
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        list(world.captions), True, negative_prompt="", device=device, clean_caption=True
    )
    return embeds, mask, negative_embeds[:1], negative_mask[:1]


def teacher_eps_error(
    pipe,
    world: GaussianMixtureWorld,
    timesteps=(20, 50, 100, 200, 440, 600, 800, 999),
    num_samples: int = 256,
    seed: int = 0,
) -> dict:
    """How close a teacher pipeline's epsilon is to eps*, at each of `timesteps` and over t ~ U{0..999}.

    Per row: "conditional" and "unconditional" relative errors |eps_theta - eps*|^2 / |eps*|^2 (summed over the
    samples), and "x0_rms_conditional", the RMS per latent element of the implied x0 error (sigma_t / alpha_t)
    (eps_theta - eps*), to compare with the mode std s. Full 120-token embeddings, as the pipelines run it.
    """
    from ..generator import predict_eps

    embeds, mask, empty_embeds, empty_mask = encode_world_captions(pipe, world)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float().cpu()
    generator = torch.Generator().manual_seed(seed)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype

    @torch.no_grad()
    def errors(t: torch.Tensor, conditional: bool) -> tuple[float, float]:
        caption = torch.randint(0, world.num_captions, (num_samples,), generator=generator)
        x0 = world.sample_x0(caption, generator=generator)
        x_t, alpha_t, sigma_t = diffuse(x0, t, torch.randn(x0.shape, generator=generator), alphas_cumprod)
        target = world.exact_eps(x_t, t, caption if conditional else None, alphas_cumprod)
        cond_embeds = embeds[caption] if conditional else empty_embeds.expand(num_samples, -1, -1)
        cond_mask = mask[caption] if conditional else empty_mask.expand(num_samples, -1)
        eps = predict_eps(pipe.transformer, x_t.to(device, dtype), t.to(device), cond_embeds, cond_mask).float().cpu()
        relative = float((eps - target).square().sum() / target.square().sum())
        x0_rms = float(((sigma_t / alpha_t).view(-1, 1, 1, 1) * (eps - target)).square().mean().sqrt())
        return relative, x0_rms

    def row(t: torch.Tensor) -> dict:
        (cond, x0_rms), (uncond, _) = errors(t, True), errors(t, False)
        return {"conditional": cond, "unconditional": uncond, "x0_rms_conditional": x0_rms}

    report = {"per_timestep": {int(t): row(torch.full((num_samples,), int(t))) for t in timesteps}}
    report["uniform_t"] = row(torch.randint(0, alphas_cumprod.shape[0], (num_samples,), generator=generator))
    report["num_samples"] = num_samples
    return report


def train_teacher(world: GaussianMixtureWorld, config: TeacherConfig, log_every: int = 0):
    """Build and train the tiny PixArt-alpha teacher pipeline of `world` in memory; returns (pipe, train_log)."""
    from diffusers import PixArtAlphaPipeline

    from ..generator import predict_eps
    from ..testing import tiny_pixart_components

    # 1. The pipeline: the tiny fixture's tokenizer, T5, VAE and scheduler, and a transformer shaped for the world
    components = tiny_pixart_components(seed=config.seed, **config.transformer_overrides(world))
    pipe = PixArtAlphaPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float()

    # 2. Caption embeddings, encoded once. Padding tokens are masked out of cross-attention (bias -10000, exp(.) == 0
    # in float32), so cutting every embedding after the last real token changes nothing but the cost.
    with torch.no_grad():
        embeds, mask, empty_embeds, empty_mask = encode_world_captions(pipe, world)
    length = int(torch.cat([mask, empty_mask]).nonzero()[:, 1].max()) + 1
    embeds, mask = embeds[:, :length], mask[:, :length]
    empty_embeds, empty_mask = empty_embeds[:, :length], empty_mask[:, :length]

    # 3. Optimiser: AdamW, linear warmup then cosine decay to zero
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # 4. Regression on the exact epsilon
    generator = torch.Generator().manual_seed(config.seed)
    transformer.train()
    log, start = [], time.perf_counter()
    for step in range(config.train_steps):
        caption = torch.randint(0, world.num_captions, (config.batch_size,), generator=generator)
        # x0 of the caption is also an x0 of the unconditional law: the caption prior is uniform
        x0 = world.sample_x0(caption, generator=generator)
        t = torch.randint(0, alphas_cumprod.shape[0], (config.batch_size,), generator=generator)
        x_t, _, _ = diffuse(x0, t, torch.randn(x0.shape, generator=generator), alphas_cumprod)
        drop = torch.rand(config.batch_size, generator=generator) < config.uncond_prob
        target = world.exact_eps(x_t, t, torch.where(drop, -1, caption), alphas_cumprod)
        cond_embeds = torch.where(drop[:, None, None], empty_embeds, embeds[caption])
        cond_mask = torch.where(drop[:, None], empty_mask, mask[caption])

        eps = predict_eps(transformer, x_t, t, cond_embeds, cond_mask)
        loss = (eps - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(log[-log_every:]) / log_every
            print(
                f"step {step + 1}/{config.train_steps}  loss {recent:.4f}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    transformer.eval()
    return pipe, {"loss": log, "train_seconds": time.perf_counter() - start}


def load_or_build_teacher(
    world: GaussianMixtureWorld,
    config: TeacherConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    log_every: int = 0,
) -> Path:
    """The folder of the world's teacher (a complete PixArt-alpha pipeline, safetensors, plus WORLD_FILE), trained
    once and cached under `cache_dir` (default `default_cache_dir()`) by a hash of the world and the config."""
    config = config or TeacherConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"teacher-{teacher_cache_key(world, config)}"
    if (path / WORLD_FILE).exists() and not rebuild:
        return path

    start = time.perf_counter()
    pipe, train_log = train_teacher(world, config, log_every)
    accuracy = teacher_eps_error(pipe, world)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    loss = train_log["loss"]
    record = {
        "world": world.to_dict(),
        "teacher": asdict(config),
        "version": TEACHER_BUILD_VERSION,
        "captions": list(world.captions),
        "train_seconds": round(train_log["train_seconds"], 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(loss[-50:]) / len(loss[-50:]),
        "relative_eps_error": accuracy,
    }
    (tmp / WORLD_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_world(teacher_path: str | os.PathLike) -> GaussianMixtureWorld:
    """The world a cached teacher folder was trained on."""
    return GaussianMixtureWorld.from_dict(read_teacher_record(teacher_path)["world"])


def read_teacher_record(teacher_path: str | os.PathLike) -> dict:
    """WORLD_FILE of a teacher folder: world, teacher config, build time and relative eps error."""
    return json.loads((Path(teacher_path) / WORLD_FILE).read_text())
