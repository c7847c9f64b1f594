"""How diverse a one-step generator is, and how close it stays to its teacher, from samples of both on the same noises.

The trainer's validation (`sim_diffusers.training.validation`) draws N fixed noises z_1..z_N per prompt, and compares
the generator's samples x_i = G(z_i, c) with the teacher's ODE samples y_i = T(z_i, c) from the same noises:

    spread(y)               = mean over pairs i < j of |y_i - y_j|       (L2 over all latent elements)
    diversity ratio         = spread(x) / spread(y)                      1: the teacher's diversity; 0: one sample
    teacher agreement       = mean_i |x_i - y_i| / spread(y)             0: the teacher's own samples; 1: as far from
                                                                         the teacher's sample as an unrelated one

A generator that collapses onto one mode of a prompt keeps only the within-mode spread, so its diversity ratio falls
towards 0 whatever the teacher's modes look like; one that keeps every mode in the teacher's proportions keeps it
near 1. With well separated modes the ratio is a ratio of pair counts: a teacher split w : 1 - w between two modes
and a generator split v : 1 - v over the same N noises give v (1 - v) / (w (1 - w)) (a 3 : 1 generator against a
1 : 1 teacher: 0.75). The mean distance (not its square) keeps the statistic linear in that count and robust to a
few far samples. The agreement is the regression term's distance on held-out noises, in the same unit.

Only torch is imported here.
"""

from __future__ import annotations

import torch


def _flat(samples: torch.Tensor) -> torch.Tensor:
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise ValueError(f"Need at least 2 samples as (N, ...), got shape {tuple(samples.shape)}.")
    return samples.detach().reshape(samples.shape[0], -1).double()


def spread(samples: torch.Tensor) -> float:
    """Mean L2 distance over the N (N - 1) / 2 pairs of distinct samples; samples (N, C, h, w) or (N, D)."""
    x = _flat(samples)
    n = x.shape[0]
    distances = torch.cdist(x, x)
    return float(distances.triu(diagonal=1).sum() / (n * (n - 1) / 2))


def diversity_ratio(generator_samples: torch.Tensor, teacher_samples: torch.Tensor) -> float:
    """spread(generator) / spread(teacher) of one prompt's samples (module docstring)."""
    return spread(generator_samples) / spread(teacher_samples)


def paired_distance(generator_samples: torch.Tensor, teacher_samples: torch.Tensor) -> float:
    """Mean L2 distance between each generator sample and the teacher's sample from the same noise (row i of both)."""
    x, y = _flat(generator_samples), _flat(teacher_samples)
    if x.shape != y.shape:
        raise ValueError(f"Generator and teacher samples differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}.")
    return float((x - y).norm(dim=1).mean())


def teacher_agreement(generator_samples: torch.Tensor, teacher_samples: torch.Tensor) -> float:
    """paired_distance / spread(teacher) of one prompt's samples (module docstring)."""
    return paired_distance(generator_samples, teacher_samples) / spread(teacher_samples)


def prompt_statistics(generator_samples: torch.Tensor, teacher_samples: torch.Tensor) -> dict[str, float]:
    """Every statistic of one prompt: diversity_ratio, teacher_agreement, and the two spreads they are made of."""
    generator_spread, teacher_spread = spread(generator_samples), spread(teacher_samples)
    return {
        "diversity_ratio": generator_spread / teacher_spread,
        "teacher_agreement": paired_distance(generator_samples, teacher_samples) / teacher_spread,
        "generator_spread": generator_spread,
        "teacher_spread": teacher_spread,
    }
