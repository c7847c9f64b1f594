"""Ground-truth metrics of any sampler of a `GaussianMixtureWorld` (per caption, then averaged over captions).

    fidelity   fraction of samples whose pattern (their P = C (H/b) (W/b) block means) lies within
               `world.fidelity_radius` of the pattern of a mode of their own caption. The radius is 2x the 99.9%
               quantile of that distance for exact samples, (s / b) chi_P; a blend of two modes with more than ~15%
               of the other (the default world) is off-mode, while within-block texture is left to the MMD. The world
               refuses parameters for which two modes' balls overlap.
    coverage   fraction of the caption's modes that received at least COVERAGE_SHARE (10%) of their expected share
               (w_k n) of the samples, and at least one.
    weight_tv  total variation between the empirical mode weights among on-mode samples and w (1 when no sample is
               on a mode).
    mmd        maximum mean discrepancy (biased V-statistic, square-rooted) to as many exact samples of the caption,
               Gaussian kernel exp(-|x - y|^2 / (2 h^2)) with h = s sqrt(2 D), the typical distance between two exact
               samples of one mode. Its noise floor is the same statistic between two exact sample sets.
    off_caption  fraction of samples on a mode of another caption.

Only torch is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .world import GaussianMixtureWorld

COVERAGE_SHARE = 0.1
METRIC_KEYS = ("fidelity", "coverage", "weight_tv", "mmd", "off_caption")


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """sqrt of the biased (V-statistic) MMD^2 with kernel exp(-|x - y|^2 / (2 bandwidth^2)); x (N, D), y (M, D)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()

    def kernel_mean(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2)).mean()

    return float((kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)).clamp_min(0).sqrt())


def caption_metrics(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor, reference: torch.Tensor):
    """Fidelity, coverage, weight TV, off-caption fraction, mode counts and MMD of one caption's samples (N, C, H, W)
    against exact samples `reference` of the same caption."""
    if tuple(samples.shape[1:]) != world.latent_shape:
        raise ValueError(f"Samples must be (N, {', '.join(map(str, world.latent_shape))}), got {tuple(samples.shape)}")
    samples = samples.detach().float().cpu()
    num_samples = samples.shape[0]
    nearest, distance = world.assign_modes(samples)
    on_mode = distance < world.fidelity_radius
    own = nearest // world.modes_per_caption == caption_idx
    on_own = on_mode & own
    counts = torch.bincount(nearest[on_own] % world.modes_per_caption, minlength=world.modes_per_caption)
    threshold = torch.clamp(COVERAGE_SHARE * world.weights * num_samples, min=1.0)
    total = int(counts.sum())
    weight_tv = 0.5 * float((counts / total - world.weights).abs().sum()) if total else 1.0
    return {
        "caption": world.captions[caption_idx],
        "num_samples": num_samples,
        "fidelity": float(on_own.float().mean()),
        "off_caption": float((on_mode & ~own).float().mean()),
        "coverage": float((counts >= threshold).float().mean()),
        "weight_tv": weight_tv,
        "mode_counts": counts.tolist(),
        "mmd": mmd(samples, reference, world.mmd_bandwidth),
    }


def evaluate_pipeline_latents(
    world: GaussianMixtureWorld,
    latents_by_caption: Sequence[torch.Tensor] | Mapping[str | int, torch.Tensor],
    reference_seed: int = 1234,
) -> dict:
    """All metrics of samples (x0 latents, e.g. a pipeline's output_type="latent") of every caption.

    Args:
        latents_by_caption: one (N, C, H, W) tensor per caption, in `world.captions` order, or a mapping from
            caption text or index to it.
        reference_seed: seed of the exact samples the MMD compares against (the same for every sampler evaluated).

    Returns: {"per_caption": [metrics per caption], "mean": {metric: mean over captions},
              "floor": {metric: mean over captions of the same metrics for an exact sample set}}. "floor" is what a
              perfect sampler with as many samples scores; its "mmd" is the MMD noise floor.
    """
    if isinstance(latents_by_caption, Mapping):
        by_index = {
            world.captions.index(k) if isinstance(k, str) else int(k): v for k, v in latents_by_caption.items()
        }
        latents_by_caption = [by_index[i] for i in range(world.num_captions)]
    if len(latents_by_caption) != world.num_captions:
        raise ValueError(f"Give samples for all {world.num_captions} captions, got {len(latents_by_caption)}.")
    per_caption, floor = [], []
    for caption_idx, samples in enumerate(latents_by_caption):
        generator = torch.Generator().manual_seed(reference_seed + caption_idx)
        reference = world.sample_x0(caption_idx, samples.shape[0], generator)
        exact = world.sample_x0(caption_idx, samples.shape[0], generator)
        per_caption.append(caption_metrics(world, caption_idx, samples, reference))
        floor.append(caption_metrics(world, caption_idx, exact, reference))
    return {"per_caption": per_caption, "mean": _mean_metrics(per_caption), "floor": _mean_metrics(floor)}


def _mean_metrics(rows: Sequence[dict]) -> dict:
    return {key: sum(row[key] for row in rows) / len(rows) for key in METRIC_KEYS}
