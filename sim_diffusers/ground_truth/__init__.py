"""A ground-truth world for distillation: a caption-conditioned Gaussian mixture in PixArt's latent space whose
diffused epsilon is known exactly, a real tiny PixArt-alpha teacher of it, and exact metrics for any sampler of it.

    world      `GaussianMixtureWorld`: captions, modes, exact samples and exact (guided) epsilon.
    metrics    `evaluate_pipeline_latents`: prompt fidelity, mode coverage, mode-weight error, MMD and its noise floor.
    samplers   any pipeline, the exact-epsilon oracle and the teacher's DPM-Solver++, all from the same noise.
    teacher    `load_or_build_teacher`: the tiny PixArt-alpha teacher, trained once and cached (`default_cache_dir`).

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.ground_truth import GaussianMixtureWorld, evaluate_pipeline, load_or_build_teacher

    world = GaussianMixtureWorld.quick()
    teacher = load_or_build_teacher(world)                    # a PixArtAlphaPipeline folder
    scores = evaluate_pipeline(SIMOneStepPipeline.from_teacher(teacher), world)["mean"]

The world and the metrics import only torch; the teacher and the samplers use diffusers through the pipelines.
`python -m benchmarks.ground_truth.distill` is the benchmark built on it (docs/ground_truth.md).
"""

from .metrics import COVERAGE_SHARE, METRIC_KEYS, caption_metrics, evaluate_pipeline_latents, mmd
from .samplers import (
    evaluate_pipeline,
    initial_noise,
    sample_exact_latents,
    sample_pipeline_latents,
    sample_teacher_latents,
)
from .teacher import (
    CACHE_ENV,
    TEACHER_BUILD_VERSION,
    WORLD_FILE,
    TeacherConfig,
    default_cache_dir,
    encode_world_captions,
    load_or_build_teacher,
    load_world,
    read_teacher_record,
    teacher_cache_key,
    teacher_eps_error,
    train_teacher,
)
from .world import (
    CAPTION_COLORS,
    CAPTION_SHAPES,
    PIXART_BETA_END,
    PIXART_BETA_START,
    PIXART_NUM_TRAIN_TIMESTEPS,
    RADIUS_MARGIN,
    RADIUS_QUANTILE,
    GaussianMixtureWorld,
    chi_quantile,
    pixart_alphas_cumprod,
)

__all__ = [
    "CACHE_ENV",
    "CAPTION_COLORS",
    "CAPTION_SHAPES",
    "COVERAGE_SHARE",
    "METRIC_KEYS",
    "PIXART_BETA_END",
    "PIXART_BETA_START",
    "PIXART_NUM_TRAIN_TIMESTEPS",
    "RADIUS_MARGIN",
    "RADIUS_QUANTILE",
    "TEACHER_BUILD_VERSION",
    "WORLD_FILE",
    "GaussianMixtureWorld",
    "TeacherConfig",
    "caption_metrics",
    "chi_quantile",
    "default_cache_dir",
    "encode_world_captions",
    "evaluate_pipeline",
    "evaluate_pipeline_latents",
    "initial_noise",
    "load_or_build_teacher",
    "load_world",
    "mmd",
    "pixart_alphas_cumprod",
    "read_teacher_record",
    "sample_exact_latents",
    "sample_pipeline_latents",
    "sample_teacher_latents",
    "teacher_cache_key",
    "teacher_eps_error",
    "train_teacher",
]
