"""The ground-truth benchmark's figures, drawn with PIL (no plotting library needed).

`draw_figure`: the metrics over training from step 0 (the untrained generator) on the left, example latents of the
world, the teacher and the one-step generator on the right. `draw_signal_figure`: the trainer's validation signal (the
diversity ratio, which needs no ground truth) next to the true mode coverage and weight TV over training, one panel
per configuration (`benchmarks.ground_truth.collapse_signal`, docs/training.md "Is my run working?")."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

METRIC_STYLE = {  # metric key -> (legend label, colour)
    "fidelity": ("fidelity", (31, 119, 180)),
    "coverage": ("coverage", (214, 39, 40)),
    "weight_tv": ("weight TV", (44, 160, 44)),
    "mmd": ("MMD", (148, 103, 189)),
    "diversity_ratio_min": ("diversity ratio, min (trainer)", (255, 127, 14)),
}
GRID, AXIS, MUTED = (225, 225, 225), (0, 0, 0), (110, 110, 110)
TILE, TILE_GAP = 28, 3
PLOT = dict(left=70, top=70, right=520, bottom=380)  # the metrics panel, in pixels
LATENT_RANGE = 1.5  # tiles show latent values in [-1.5, 1.5] (mode means are +-0.8): black to white


def nice_ticks(upper: float, max_ticks: int = 7) -> list[float]:
    """0, d, 2d, ... up to `upper`, d in {1, 2, 5} x 10^k, with at most `max_ticks` ticks."""
    if upper <= 0:
        return [0.0]
    step = 10 ** math.floor(math.log10(upper))
    for factor in (0.1, 0.2, 0.5, 1, 2, 5, 10):
        if upper / (step * factor) <= max_ticks - 1:
            step *= factor
            break
    return [i * step for i in range(int(upper / step + 1e-9) + 1)]


def _dashed(draw, start, end, fill, width=1, dash=6):
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    for i in range(0, int(length), 2 * dash):
        a, b = i / length, min(i + dash, length) / length
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill, width)


def _tile(latent: torch.Tensor) -> Image.Image:
    """Channel 0 of one latent (C, H, W) as a grey square, nearest-neighbour enlarged."""
    values = (latent[0].float().clamp(-LATENT_RANGE, LATENT_RANGE) + LATENT_RANGE) / (2 * LATENT_RANGE) * 255
    return Image.fromarray(values.round().byte().numpy(), "L").resize((TILE, TILE), Image.NEAREST)


def draw_figure(
    path,
    title: str,
    curve: list[dict],
    sample_sets: list[tuple[str, list[torch.Tensor]]],
    captions,
    references: dict | None = None,
    warmup_end: int | None = None,
) -> None:
    """Write the figure to `path` (PNG).

    Args:
        curve: [{"step": s, metric: value, ...}] from step 0, one point per evaluation (mean over seeds).
        sample_sets: [(label, latents per caption (N, C, H, W))], drawn as rows of tiles.
        references: {label: fidelity} drawn as dashed horizontal lines in the fidelity colour (e.g. the teacher's).
        warmup_end: the step where the regression warm-up ends, drawn as a dashed vertical line.
    """
    font, small, large = (ImageFont.load_default(size=s) for s in (13, 11, 16))
    per_sample = max((len(latents[0]) for _, latents in sample_sets), default=0)
    label_width = 110
    right_width = label_width + per_sample * (TILE + TILE_GAP)
    sets_height = sum(24 + len(latents) * (TILE + TILE_GAP) for _, latents in sample_sets)
    samples_title = (
        f"samples ({per_sample} per caption): latent channel 0, black = -{LATENT_RANGE:g}, white = +{LATENT_RANGE:g}"
    )
    right_width = max(right_width, int(font.getlength(samples_title)))
    plot = PLOT
    width = plot["right"] + 50 + right_width + 20
    height = max(plot["bottom"] + 110, 70 + 20 + sets_height + 10)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width // 2, 12), title, fill=AXIS, font=large, anchor="mt")

    # 1. Axes, ticks and grid: x = training step from 0, y = metric value in [0, 1]
    max_step = max((row["step"] for row in curve), default=1) or 1
    x_of = lambda step: plot["left"] + (plot["right"] - plot["left"]) * step / max_step  # noqa: E731
    y_of = lambda v: plot["bottom"] - (plot["bottom"] - plot["top"]) * min(max(v, 0.0), 1.0)  # noqa: E731
    draw.text(
        ((plot["left"] + plot["right"]) // 2, plot["top"] - 22),
        "metrics over training (step 0 = untrained)",
        fill=AXIS,
        font=font,
        anchor="mt",
    )
    for tick in nice_ticks(max_step):
        x = x_of(tick)
        draw.line([(x, plot["top"]), (x, plot["bottom"])], GRID)
        draw.line([(x, plot["bottom"]), (x, plot["bottom"] + 4)], AXIS)
        draw.text((x, plot["bottom"] + 7), f"{tick:g}", fill=AXIS, font=small, anchor="mt")
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = y_of(tick)
        draw.line([(plot["left"], y), (plot["right"], y)], GRID)
        draw.line([(plot["left"] - 4, y), (plot["left"], y)], AXIS)
        draw.text((plot["left"] - 7, y), f"{tick:.1f}", fill=AXIS, font=small, anchor="rm")
    draw.rectangle([plot["left"], plot["top"], plot["right"], plot["bottom"]], outline=AXIS)
    draw.text(
        ((plot["left"] + plot["right"]) // 2, plot["bottom"] + 24), "training step", fill=AXIS, font=font, anchor="mt"
    )
    y_label = Image.new("RGBA", (200, 18), (255, 255, 255, 0))
    ImageDraw.Draw(y_label).text((100, 9), "metric value", fill=AXIS, font=font, anchor="mm")
    y_label = y_label.rotate(90, expand=True)
    canvas.paste(y_label, (12, (plot["top"] + plot["bottom"]) // 2 - 100), y_label)

    # 2. Reference lines, then the curves over them
    references_legend = []
    if warmup_end is not None and 0 < warmup_end < max_step:
        _dashed(draw, (x_of(warmup_end), plot["top"]), (x_of(warmup_end), plot["bottom"]), MUTED)
        references_legend.append(("end of regression warm-up", MUTED, "dashed"))
    for label, value in (references or {}).items():
        _dashed(draw, (plot["left"], y_of(value)), (plot["right"], y_of(value)), METRIC_STYLE["fidelity"][1], 2)
        references_legend.append((f"fidelity of {label}", METRIC_STYLE["fidelity"][1], "dashed"))
    for key, (label, colour) in METRIC_STYLE.items():
        points = [(x_of(row["step"]), y_of(row[key])) for row in curve if key in row]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    present = [key for key in METRIC_STYLE if any(key in row for row in curve)]
    legend = [(*METRIC_STYLE[key], "solid") for key in present] + references_legend

    # 3. Legend below the x label, two columns
    legend_top = plot["bottom"] + 46
    for i, (label, colour, style) in enumerate(legend):
        x, y = plot["left"] + (i % 2) * 230, legend_top + (i // 2) * 17
        if style == "dashed":
            _dashed(draw, (x, y + 6), (x + 24, y + 6), colour, 2, dash=4)
        else:
            draw.line([(x, y + 6), (x + 24, y + 6)], colour, 2)
        draw.text((x + 30, y), label, fill=AXIS, font=small)

    # 4. Example latents: a row of tiles per caption, one block per sampler
    x0, y = plot["right"] + 50, plot["top"] - 22
    draw.text((x0, y), samples_title, fill=AXIS, font=font)
    y += 24
    for label, latents in sample_sets:
        draw.text((x0, y), label, fill=AXIS, font=font)
        y += 20
        for caption, caption_latents in zip(captions, latents):
            draw.text((x0, y + TILE // 2), caption, fill=MUTED, font=small, anchor="lm")
            for j, latent in enumerate(caption_latents):
                canvas.paste(_tile(latent), (x0 + label_width + j * (TILE + TILE_GAP), y))
            y += TILE + TILE_GAP
        y += 4
    canvas.save(path)


SIGNAL_STYLE = {  # curve key -> (legend label, colour, dashed)
    "diversity_ratio_min": ("diversity ratio, min over captions (trainer, no ground truth)", (255, 127, 14), False),
    "coverage": ("true mode coverage", (214, 39, 40), False),
    "weight_tv": ("true weight TV", (44, 160, 44), True),
}
SIGNAL_PANEL = dict(width=330, height=250, left=60, top=60, gap=40)
WARNING_COLOUR = (0, 0, 0)


def first_warning(curve: list[dict], threshold: float) -> int | None:
    """The first step after 0 whose minimum diversity ratio is below `threshold` (where the trainer warns)."""
    for row in curve:
        if row["step"] > 0 and row.get("diversity_ratio_min", float("inf")) < threshold:
            return row["step"]
    return None


def draw_signal_figure(path, title: str, panels: list[tuple[str, list[list[dict]]]], threshold: float) -> None:
    """Write the signal figure to `path` (PNG): one panel per configuration, every seed's curves overlaid.

    Args:
        panels: [(label, [curve of one seed: [{"step", "coverage", "weight_tv", "diversity_ratio_min"}, ...]])].
        threshold: the collapse threshold, drawn dashed; a black triangle marks each seed's first warning.
    """
    font, small, large = (ImageFont.load_default(size=s) for s in (13, 11, 16))
    box = SIGNAL_PANEL
    width = box["left"] + len(panels) * (box["width"] + box["gap"])
    height = box["top"] + box["height"] + 110
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width // 2, 12), title, fill=AXIS, font=large, anchor="mt")
    for i, (label, curves) in enumerate(panels):
        left = box["left"] + i * (box["width"] + box["gap"])
        right, top, bottom = left + box["width"], box["top"], box["top"] + box["height"]
        max_step = max((row["step"] for curve in curves for row in curve), default=1) or 1
        x_of = lambda step, left=left, right=right, max_step=max_step: left + (right - left) * step / max_step  # noqa: E731
        y_of = lambda v, top=top, bottom=bottom: bottom - (bottom - top) * min(max(v, 0.0), 1.2) / 1.2  # noqa: E731
        seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
        draw.text(((left + right) // 2, top - 22), f"{label} ({seeds})", fill=AXIS, font=font, anchor="mt")
        for tick in nice_ticks(max_step, 6):
            draw.line([(x_of(tick), top), (x_of(tick), bottom)], GRID)
            draw.text((x_of(tick), bottom + 7), f"{tick:g}", fill=AXIS, font=small, anchor="mt")
        for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2):
            draw.line([(left, y_of(tick)), (right, y_of(tick))], GRID)
            draw.text((left - 7, y_of(tick)), f"{tick:.1f}", fill=AXIS, font=small, anchor="rm")
        draw.rectangle([left, top, right, bottom], outline=AXIS)
        draw.text(((left + right) // 2, bottom + 24), "training step", fill=AXIS, font=font, anchor="mt")
        _dashed(draw, (left, y_of(threshold)), (right, y_of(threshold)), MUTED, 2)
        for curve in curves:
            for key, (_, colour, dashed) in SIGNAL_STYLE.items():
                points = [(x_of(row["step"]), y_of(row[key])) for row in curve if key in row]
                for a, b in zip(points, points[1:]):
                    _dashed(draw, a, b, colour, 2, dash=3) if dashed else draw.line([a, b], fill=colour, width=2)
            warned = first_warning(curve, threshold)
            if warned is not None:
                x = x_of(warned)
                draw.polygon([(x, bottom - 12), (x - 6, bottom), (x + 6, bottom)], fill=WARNING_COLOUR)
    legend = [(label, colour, "dashed" if dashed else "solid") for label, colour, dashed in SIGNAL_STYLE.values()]
    legend += [
        (f"collapse threshold ({threshold:g})", MUTED, "dashed"),
        ("first warning (triangle)", WARNING_COLOUR, "solid"),
    ]
    legend_top = box["top"] + box["height"] + 48
    for i, (label, colour, style) in enumerate(legend):
        x, y = box["left"] + (i % 3) * 380, legend_top + (i // 3) * 17
        if style == "dashed":
            _dashed(draw, (x, y + 6), (x + 24, y + 6), colour, 2, dash=4)
        else:
            draw.line([(x, y + 6), (x + 24, y + 6)], colour, 2)
        draw.text((x + 30, y), label, fill=AXIS, font=small)
    canvas.save(path)
