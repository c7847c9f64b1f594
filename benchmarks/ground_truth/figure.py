"""The ground-truth benchmark's figure, drawn with PIL (no plotting library needed): the metrics over training from
step 0 (the untrained generator) on the left, example latents of the world, the teacher and the one-step generator on
the right."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

METRIC_STYLE = {  # metric key -> (legend label, colour)
    "fidelity": ("fidelity", (31, 119, 180)),
    "coverage": ("coverage", (214, 39, 40)),
    "weight_tv": ("weight TV", (44, 160, 44)),
    "mmd": ("MMD", (148, 103, 189)),
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
    legend = [(label, colour, "solid") for label, colour in METRIC_STYLE.values()] + references_legend

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
