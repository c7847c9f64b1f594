"""Diagnostics of where a sampler's misses lie in noise space (research: `anatomy.py` and `transitions.py` use them).

`off_mode_anatomy` tells global blends of two modes from samples whose regions follow different modes; `band_widths`
measures the width of the off-mode band a miss lies in along a line of noise; `circle_crossings` counts a sampler's
boundary crossings along great circles of noise (their mean estimates the boundary's Gaussian measure).
"""

from __future__ import annotations

import math

import torch

from sim_diffusers.ground_truth import GaussianMixtureWorld


def off_mode_anatomy(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor) -> dict:
    """What the off-mode samples of one caption look like: global blends, or regions that follow different modes.

    For each sample farther than the fidelity radius from every mode of its caption, take its two nearest modes a
    (nearest) and b and the blocks where their signs differ (the contested blocks). A contested block's position
    u = (m - mu_b) / (mu_a - mu_b) is 1 on mode a's value and 0 on b's. A global blend has the same u in every
    contested block; a sample whose regions decided differently has some blocks near 1 and others near 0.

    Returns the off-mode fraction and, averaged over off-mode samples: the share of contested blocks committed to a
    (u > 0.75), to b (u < 0.25) or in between, and the fraction of off-mode samples whose contested blocks disagree
    (max u - min u > 0.5: "regionally inconsistent").
    """
    patterns = world.patterns(samples)
    own = world.patterns(world.means[caption_idx])  # (K, P)
    distances = torch.cdist(patterns, own)
    off = distances.min(dim=1).values >= world.fidelity_radius
    result = {
        "off_mode": float(off.float().mean()),
        "committed_nearest": 0.0,
        "committed_second": 0.0,
        "in_between": 0.0,
        "regionally_inconsistent": 0.0,
    }
    if not off.any():
        return result
    order = distances[off].argsort(dim=1)
    a, b = own[order[:, 0]], own[order[:, 1]]
    u = (patterns[off] - b) / (a - b).masked_fill(a == b, 1.0)
    contested = a != b
    counts = contested.sum(dim=1).clamp_min(1)
    share = lambda mask: float(((mask & contested).sum(dim=1) / counts).mean())  # noqa: E731
    spread = u.masked_fill(~contested, -math.inf).amax(dim=1) - u.masked_fill(~contested, math.inf).amin(dim=1)
    result.update(
        committed_nearest=share(u > 0.75),
        committed_second=share(u < 0.25),
        in_between=share((u >= 0.25) & (u <= 0.75)),
        regionally_inconsistent=float((spread > 0.5).float().mean()),
    )
    return result


def _own_mode_labels(world: GaussianMixtureWorld, caption_idx: int, samples: torch.Tensor) -> torch.Tensor:
    """For samples (..., C, H, W): the index of the caption's mode each lies within the fidelity radius of, else -1;
    shape (...)."""
    flat = samples.reshape(-1, *samples.shape[-3:])
    nearest = torch.cdist(world.patterns(flat), world.patterns(world.means[caption_idx])).min(dim=1)
    return torch.where(nearest.values < world.fidelity_radius, nearest.indices, -1).reshape(samples.shape[:-3])


def band_widths(
    world: GaussianMixtureWorld, caption_idx: int, line_samples: torch.Tensor, offsets: torch.Tensor
) -> dict:
    """How wide, in noise space, the off-mode band is that an off-mode sample's noise lies in.

    A sampler maps noise z ~ N(0, I) to latents; its off-mode samples come from the noise between the regions it sends
    to different modes. `line_samples` (M, K, C, H, W) are its outputs along M lines in noise space, each through the
    noise of an off-mode sample at `offsets` (K,), evenly spaced, increasing and containing 0 (that sample). The band
    through a line is the run of off-mode points around offset 0; its width is estimated as (points in the run) x
    spacing, unbiased when the band's edges fall anywhere between grid points.

    Returns per line (M,): "width" (nan where the run reaches an end of the line), "censored" (it does),
    "between_modes" (on-mode points of two different modes of the caption bound it) and "max_slope" (the largest
    latent distance between neighbouring points over their noise distance: a lower bound on the map's local Lipschitz
    constant).
    """
    num_lines, num_points = line_samples.shape[:2]
    if offsets.shape != (num_points,) or not bool((offsets.diff() > 0).all()) or not bool((offsets == 0).any()):
        raise ValueError("offsets must be K increasing values, one of them 0, K = line_samples.shape[1].")
    labels = _own_mode_labels(world, caption_idx, line_samples)
    spacing = float(offsets.diff().mean())
    center = int((offsets == 0).nonzero())
    width = torch.full((num_lines,), math.nan)
    censored = torch.zeros(num_lines, dtype=torch.bool)
    between_modes = torch.zeros(num_lines, dtype=torch.bool)
    for m, line in enumerate(labels.tolist()):
        if line[center] != -1:  # not off-mode after all: a band of width 0
            width[m] = 0.0
            continue
        lo, hi = center, center
        while lo > 0 and line[lo - 1] == -1:
            lo -= 1
        while hi < num_points - 1 and line[hi + 1] == -1:
            hi += 1
        if lo == 0 or hi == num_points - 1:
            censored[m] = True
            continue
        width[m] = (hi - lo + 1) * spacing
        between_modes[m] = line[lo - 1] != line[hi + 1]
    steps = line_samples.detach().float().cpu().flatten(2).diff(dim=1).norm(dim=2) / offsets.diff()
    return {"width": width, "censored": censored, "between_modes": between_modes, "max_slope": steps.amax(dim=1)}


def circle_crossings(world: GaussianMixtureWorld, caption_idx: int, circle_samples: torch.Tensor) -> dict:
    """Boundary crossings of a sampler's map along great circles of noise, z(theta) = cos(theta) z1 + sin(theta) z2.

    With z1, z2 independent N(0, I), every z(theta) is N(0, I) and so is its direction dz/dtheta, independently; by
    the Gaussian Crofton (Rice) formula a circle then crosses a boundary of Gaussian surface measure A on average
    2 pi sqrt(2 / pi) A = 5.01 A times. `circle_samples` (M, K, C, H, W) are the sampler's outputs at K evenly spaced
    angles of M circles. Going round a circle, the caption's mode changes at each boundary: in one step ("clean") or
    through off-mode points (a band). Off-mode runs that return to the mode they left are excursions.

    Returns totals over the circles: "circles", "points", "off_mode" points, "crossings" (changes of mode), "clean"
    crossings, "band_points" (off-mode points inside crossings) and "excursion_points"; circles with no point on a
    mode are counted in "circles_off_mode" and add no crossing.
    """
    num_circles, num_points = circle_samples.shape[:2]
    labels = _own_mode_labels(world, caption_idx, circle_samples)
    totals = dict(
        circles=num_circles,
        points=num_circles * num_points,
        off_mode=int((labels == -1).sum()),
        crossings=0,
        clean=0,
        band_points=0,
        excursion_points=0,
        circles_off_mode=0,
    )
    for circle in labels.tolist():
        on = [k for k, label in enumerate(circle) if label != -1]
        if not on:
            totals["circles_off_mode"] += 1
            continue
        for here, there in zip(on, on[1:] + [on[0] + num_points]):  # cyclic: the last on-mode point to the first
            gap = there - here - 1
            if circle[here] != circle[there % num_points]:
                totals["crossings"] += 1
                totals["clean"] += gap == 0
                totals["band_points"] += gap
            else:
                totals["excursion_points"] += gap
    return totals
