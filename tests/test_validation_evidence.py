"""The ground-truth evidence for the trainer's validation: distill.py puts the trainer's values next to the exact
metrics of the same step, and collapse_signal.py reads correlations, warnings and the figure off them."""

import json

import pytest
from PIL import Image

from benchmarks.ground_truth import collapse_signal, distill
from benchmarks.ground_truth.figure import SIGNAL_PANEL, SIGNAL_STYLE, draw_signal_figure, first_warning


def caption(name, coverage, weight_tv):
    return {"caption": name, "coverage": coverage, "weight_tv": weight_tv}


def test_the_trainers_values_join_the_exact_metrics_of_their_step():
    curve = [
        {"step": 0, "coverage": 1.0, "per_caption": [caption("a", 1.0, 0.1), caption("b", 1.0, 0.1)]},
        {"step": 100, "coverage": 0.5, "per_caption": [caption("a", 1.0, 0.1), caption("b", 0.0, 0.6)]},
        {"step": 150, "coverage": 0.5, "per_caption": [caption("a", 1.0, 0.1), caption("b", 0.0, 0.6)]},
    ]
    validations = [
        {
            "step": 0,
            "diversity_ratio_min": 0.9,
            "teacher_agreement": 0.5,
            "prompts": {
                "a": {"diversity_ratio": 0.95, "teacher_agreement": 0.4},
                "b": {"diversity_ratio": 0.9, "teacher_agreement": 0.6},
            },
        },
        {
            "step": 100,
            "diversity_ratio_min": 0.2,
            "teacher_agreement": 0.8,
            "prompts": {
                "a": {"diversity_ratio": 0.9, "teacher_agreement": 0.5},
                "b": {"diversity_ratio": 0.2, "teacher_agreement": 1.1},
            },
        },
        {"step": 50, "diversity_ratio_min": 0.5, "teacher_agreement": 0.7, "prompts": {}},  # no checkpoint there
    ]
    distill.add_validation_values(curve, validations)
    assert curve[1]["diversity_ratio_min"] == 0.2 and curve[1]["teacher_agreement"] == 0.8
    assert (
        curve[1]["per_caption"][1]["diversity_ratio"] == 0.2 and curve[1]["per_caption"][0]["diversity_ratio"] == 0.9
    )
    assert "diversity_ratio_min" not in curve[2]  # not validated at that step
    assert [row["step"] for row in curve] == [0, 100, 150]

    runs = [{"curve": curve}, {"curve": [dict(row, diversity_ratio_min=0.4) for row in curve]}]
    for run in runs:
        for row in run["curve"]:
            row.update(fidelity=0.5, weight_tv=0.1, mmd=0.2, off_caption=0.0)
    mean = distill.mean_curve(runs)
    assert mean[1]["diversity_ratio_min"] == pytest.approx(0.3)  # averaged over the seeds
    assert "diversity_ratio_min" not in mean[2] or mean[2]["diversity_ratio_min"] == pytest.approx(0.4)
    assert "teacher_agreement" not in mean[2]  # only where every seed has it


def test_parallel_one_seed_runs_of_one_configuration_keep_their_own_files():
    assert distill.output_stem("default", [0]) == "default-seed0"
    assert distill.output_stem("default", [1]) == "default-seed1"
    assert distill.output_stem("sim", [0, 1, 2]) == "sim-seed0-1-2"


def collapsing_curve():
    """Coverage 1 -> 1/3 while the ratio falls from 0.9 to 0.1: the warning (at 0.5) comes at step 100, while
    coverage is still 0.75."""
    steps = [0, 50, 100, 150, 200]
    ratios = [0.9, 0.7, 0.45, 0.2, 0.1]
    coverage = [1.0, 1.0, 0.75, 0.5, 1 / 3]
    tv = [0.1, 0.15, 0.3, 0.45, 0.6]
    return [
        {
            "step": s,
            "coverage": c,
            "weight_tv": t,
            "diversity_ratio_min": r,
            "teacher_agreement": 1.2 - r,
            "per_caption": [dict(caption("a", c, t), diversity_ratio=r, teacher_agreement=1.2 - r)],
        }
        for s, r, c, t in zip(steps, ratios, coverage, tv)
    ]


def test_warnings_are_read_against_the_true_coverage():
    curve = collapsing_curve()
    assert first_warning(curve, 0.5) == 100
    assert first_warning(curve, 0.05) is None
    assert first_warning([{"step": 0, "diversity_ratio_min": 0.1}], 0.5) is None  # step 0 is the baseline
    found = collapse_signal.warnings_against_coverage({"name": "plain", "seed": 0, "curve": curve}, 0.5)
    assert found["first_warning"] == 100 and found["coverage_at_warning"] == 0.75
    assert found["coverage_below_0.5_at"] == 200 and found["warned_before_coverage_below_0.5"]
    late = collapse_signal.warnings_against_coverage({"name": "plain", "seed": 0, "curve": curve}, 0.15)
    assert late["first_warning"] == 200 and not late["warned_before_coverage_below_0.5"]


def test_correlations_over_checkpoints(tmp_path):
    path = tmp_path / "plain-seed0.json"
    path.write_text(json.dumps({"name": "plain", "runs": [{"seed": 0, "curve": collapsing_curve()}]}))
    runs = collapse_signal.load_runs([path])
    c = collapse_signal.correlations(runs)
    assert c["checkpoints"] == 5
    assert c["min_ratio_vs_weight_tv"]["spearman"] == pytest.approx(-1.0)  # strictly monotone together
    assert 0.95 < c["min_ratio_vs_coverage"]["spearman"] < 1  # monotone, with ties in the coverage
    assert c["min_ratio_vs_coverage"]["pearson"] > 0.9
    assert collapse_signal.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties get average ranks


def test_the_signal_figure_draws_the_threshold_and_the_curves_from_step_0(tmp_path):
    path = tmp_path / "signal.png"
    curve = collapsing_curve()
    draw_signal_figure(path, "title", [("plain SIM", [curve]), ("default", [curve, curve])], 0.5)
    image = Image.open(path).convert("RGB")
    box = SIGNAL_PANEL
    bottom = box["top"] + box["height"]
    y = bottom - box["height"] * 0.9 / 1.2  # the ratio curve starts at 0.9, at x = step 0
    column = [image.getpixel((box["left"] + 1, round(y) + dy)) for dy in (-2, -1, 0, 1, 2)]
    assert SIGNAL_STYLE["diversity_ratio_min"][1] in column, column
    threshold_y = round(bottom - box["height"] * 0.5 / 1.2)
    assert any(image.getpixel((x, threshold_y)) != (255, 255, 255) for x in range(box["left"] + 2, box["left"] + 12))
    assert image.width >= box["left"] + 2 * box["width"]  # two panels
