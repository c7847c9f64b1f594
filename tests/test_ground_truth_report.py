"""What the ground-truth benchmark shows a reader (`benchmarks.ground_truth.distill` and its figure): the table with a
line per metric, the curve from step 0, and a figure whose curves start at step 0."""

import pytest
import torch
from PIL import Image

from benchmarks.ground_truth import distill
from benchmarks.ground_truth.figure import METRIC_STYLE, PLOT, draw_figure, nice_ticks
from sim_diffusers.ground_truth import METRIC_KEYS, GaussianMixtureWorld


def metrics(fidelity, coverage=1.0, weight_tv=0.1, mmd=0.2, off_caption=0.0):
    return dict(fidelity=fidelity, coverage=coverage, weight_tv=weight_tv, mmd=mmd, off_caption=off_caption)


def run(seed, final_fidelity):
    untrained = metrics(0.3)
    curve = [{"step": 0, **untrained}, {"step": 100, **metrics(0.6)}, {"step": 200, **metrics(final_fidelity)}]
    return {
        "seed": seed,
        "final": {"mean": metrics(final_fidelity), "floor": metrics(1.0, weight_tv=0.05)},
        "curve": curve,
    }


@pytest.mark.parametrize(
    "upper, expected",
    [(300, [0, 50, 100, 150, 200, 250, 300]), (1400, [0, 500, 1000]), (80, [0, 20, 40, 60, 80]), (7, [0, 2, 4, 6])],
)
def test_ticks_are_round_steps_from_zero(upper, expected):
    assert nice_ticks(upper) == pytest.approx(expected)


def test_the_report_says_what_each_number_means_and_starts_the_curve_at_step_0():
    world = GaussianMixtureWorld.quick()
    runs = [run(0, 0.8), run(1, 0.7)]
    args = distill.parse_args(["--world", "quick", "--max_train_steps", "200", "--num_samples", "16"])
    baseline = {"teacher 20 steps, g=1": {"mean": metrics(0.97)}}
    text = distill.report("demo", world, distill.summarise(runs), runs, baseline, runs[0]["final"]["floor"], args)
    assert "2 captions x 2 modes in 4x4x4 latents, 16 samples per caption, 200 training steps, 2 seeds" in text
    assert "| teacher 20 steps, g=1 | 0.970 |" in text
    assert "| **SIM one step: demo** (2 seeds) | 0.750 ± 0.071 |" in text  # mean ± sample std over the seeds
    for label, _ in distill.MEANINGS:
        assert sum(line.strip().startswith(label) for line in text.splitlines()) == 1, label
    curve = text[text.index("Over training") :].splitlines()
    steps = [line.split("|")[1].strip() for line in curve if line.startswith("| ") and line[2].isdigit()]
    assert steps == ["0", "100", "200"]
    assert distill.mean_curve(runs)[-1]["fidelity"] == pytest.approx(0.75)
    assert set(distill.mean_curve(runs)[0]) == {"step", *METRIC_KEYS}


def test_the_figure_draws_every_curve_from_step_0(tmp_path):
    world = GaussianMixtureWorld.quick()
    curve = [
        {"step": 0, **metrics(0.3, coverage=0.9, weight_tv=0.1, mmd=0.6)},
        {"step": 300, **metrics(0.8, coverage=0.9, weight_tv=0.1, mmd=0.2)},
    ]
    examples = [world.sample_x0(c, 8, torch.Generator().manual_seed(c)) for c in range(world.num_captions)]
    path = tmp_path / "figure.png"
    draw_figure(
        path,
        "title",
        curve,
        [("exact", examples), ("generator", examples)],
        world.captions,
        {"teacher": 0.97},
        warmup_end=200,
    )
    image = Image.open(path).convert("RGB")
    height = PLOT["bottom"] - PLOT["top"]
    for key, value in (("fidelity", 0.3), ("coverage", 0.9), ("weight_tv", 0.1), ("mmd", 0.6)):
        at_step_0 = (PLOT["left"] + 2, round(PLOT["bottom"] - height * value))  # inside the marker at x = step 0
        assert image.getpixel(at_step_0) == METRIC_STYLE[key][1], key
    assert image.width > PLOT["right"] + 8 * 28  # room for the example latents beside the plot
