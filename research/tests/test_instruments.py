"""The research instruments on the quick world's teacher: the screening harness, the ODE-map fit, the anatomy of the
misses and the transitions between modes (`research/{screen,fit_ode_map,anatomy,transitions}.py`)."""

import copy
import importlib
import json

import pytest
from diffusers import PixArtTransformer2DModel

from research import _common
from sim_diffusers.ground_truth import METRIC_KEYS


def instrument(name: str):
    """research/<name>.py as a module."""
    return importlib.import_module(f"research.{name}")


def test_screening_harness_trains_scores_and_records(quick_teacher, world, tmp_path, monkeypatch):
    """research/screen.py runs the trainer's iteration (warm-up, then SIM with and without the anchor), scores the
    live generator and its EMA, and records the run."""
    from safetensors.torch import load_file

    path, config = quick_teacher
    screen = instrument("screen")
    monkeypatch.setattr(_common, "world_and_config", lambda args: (world, config))
    out, saved = tmp_path / "screen.jsonl", tmp_path / "generator.safetensors"
    common = [
        "--world",
        "quick",
        "--cache_dir",
        str(path.parent),
        "--num_samples",
        "8",
        "--train_batch_size",
        "4",
        "--regression_num_inference_steps",
        "2",
        "--out",
        str(out),
    ]
    args = screen.parse_args(
        common
        + [
            "--steps",
            "3",
            "--eval_every",
            "1",
            "--regression_warmup_steps",
            "1",
            "--regression_until",
            "2",
            "--ema_decay",
            "0.9",
            "--save",
            str(saved),
        ]
    )
    assert args.guidance_scale == 1.0 and args.regression_every == 4 and args.learning_rate == 1e-5
    screen.main(args)
    record = json.loads(out.read_text().splitlines()[-1])
    assert [row["step"] for row in record["curve"]] == [0, 1, 2, 3]
    assert set(record["curve"][3]["ema"]) == {"fidelity", "coverage", "weight_tv", "mmd", "off_caption"}
    teacher = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(saved))
    assert max((trained[k] - teacher[k]).abs().max().item() for k in teacher) > 0
    for refused in (
        ["--regression_warmup_steps", "5", "--regression_until", "2"],
        ["--extra_layers", "-1"],
        ["--use_8bit_adam", "maybe"],
    ):
        with pytest.raises(SystemExit):
            screen.parse_args(refused)


def test_ode_map_fit_trains_saves_and_seeds_the_screening_harness(quick_teacher, world, tmp_path, monkeypatch):
    """fit_ode_map.py fits the generator to cached teacher-ODE pairs; screen.py --init_generator starts from its
    weights
    (its step-0 scores are the fit's last ones: same weights, same evaluation noise)."""

    from safetensors.torch import load_file

    path, config = quick_teacher
    modules = {name: instrument(name) for name in ("fit_ode_map", "screen")}
    monkeypatch.setattr(_common, "world_and_config", lambda args: (world, config))
    common = ["--world", "quick", "--cache_dir", str(path.parent), "--num_samples", "8"]
    saved, fit_out = tmp_path / "fit.safetensors", tmp_path / "fit.jsonl"
    fit_args = common + [
        "--num_pairs",
        "4",
        "--num_inference_steps",
        "2",
        "--steps",
        "3",
        "--eval_every",
        "3",
        "--train_batch_size",
        "4",
        "--lr",
        "1e-3",
        "--save",
        str(saved),
        "--out",
        str(fit_out),
    ]
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(fit_args))
    assert any(p.name.startswith("ode_pairs_") for p in path.parent.iterdir())  # the pairs are cached for the next fit
    modules["fit_ode_map"].main(modules["fit_ode_map"].parse_args(fit_args))  # from the cached pairs: the same fit
    modules["fit_ode_map"].main(
        modules["fit_ode_map"].parse_args(fit_args[:-4] + ["--distance", "pseudo_huber", "--out", str(fit_out)])
    )
    first, second, huber = [json.loads(line) for line in fit_out.read_text().splitlines()]
    assert first["curve"] == second["curve"]
    assert huber["curve"][0] == first["curve"][0] and huber["curve"][-1] != first["curve"][-1]  # --distance is used
    assert (
        first["curve"][-1]["on_training_noise"]["mse"] < first["curve"][0]["on_training_noise"]["mse"]
    )  # it fits its pairs
    teacher = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((load_file(str(saved))[k] - teacher[k]).abs().max().item() for k in teacher) > 0

    screen_out = tmp_path / "screen.jsonl"
    modules["screen"].main(
        modules["screen"].parse_args(
            common + ["--steps", "0", "--init_generator", str(saved), "--out", str(screen_out)]
        )
    )
    start = json.loads(screen_out.read_text())["curve"][0]
    assert {k: start[k] for k in METRIC_KEYS} == {k: first["curve"][-1][k] for k in METRIC_KEYS}

    # A deeper generator (--extra_layers) starts as the teacher's function exactly and then fits differently.
    deep_out, deep_saved = tmp_path / "deep.jsonl", tmp_path / "deep.safetensors"
    modules["fit_ode_map"].main(
        modules["fit_ode_map"].parse_args(
            fit_args[:-4] + ["--extra_layers", "2", "--save", str(deep_saved), "--out", str(deep_out)]
        )
    )
    deep = json.loads(deep_out.read_text())
    assert deep["curve"][0] == first["curve"][0] and deep["curve"][-1] != first["curve"][-1]
    # screen.py --extra_layers builds the same deeper generator, so it can start from the deeper fit.
    modules["screen"].main(
        modules["screen"].parse_args(
            common
            + ["--steps", "0", "--extra_layers", "2", "--init_generator", str(deep_saved), "--out", str(screen_out)]
        )
    )
    deep_start = json.loads(screen_out.read_text().splitlines()[-1])["curve"][0]
    assert {k: deep_start[k] for k in METRIC_KEYS} == {k: deep["curve"][-1][k] for k in METRIC_KEYS}
    teacher_model = PixArtTransformer2DModel.from_pretrained(path / "transformer")
    deeper = modules["fit_ode_map"].deepen(copy.deepcopy(teacher_model), 2)
    assert len(deeper.transformer_blocks) == deeper.config.num_layers == teacher_model.config.num_layers + 2
    deepest = modules["fit_ode_map"].deepen(copy.deepcopy(teacher_model), 2 * teacher_model.config.num_layers + 1)
    assert len(deepest.transformer_blocks) == 3 * teacher_model.config.num_layers + 1
    assert deepest.transformer_blocks[1].ff.net[-1].weight.abs().max() == 0  # the copies start as identities
    assert deepest.transformer_blocks[0].ff.net[-1].weight.abs().max() > 0
    with pytest.raises(ValueError, match="extra_layers"):
        modules["fit_ode_map"].deepen(teacher_model, -1)
    with pytest.raises(SystemExit):  # and the scripts refuse it before loading anything
        modules["fit_ode_map"].parse_args(["--extra_layers", "-1"])


def test_anatomy_script_scores_generators_and_the_teacher(quick_teacher, world, monkeypatch):
    path, config = quick_teacher
    anatomy = instrument("anatomy")
    monkeypatch.setattr(_common, "world_and_config", lambda args: (world, config))
    common = ["--world", "quick", "--cache_dir", str(path.parent), "--num_samples", "16"]
    with pytest.raises(SystemExit, match="holds no generator"):
        anatomy.main(anatomy.parse_args([str(path / "nowhere"), *common]))
    # The teacher's own weights as a generator are the untrained one-step generator: the same row.
    rows = anatomy.main(anatomy.parse_args([str(path), "--untrained", "--teacher_steps", "2", *common]))
    assert list(rows) == ["teacher 2 steps", "untrained one-step generator", str(path)]
    assert rows[str(path)] == rows["untrained one-step generator"]
    for r in rows.values():
        assert r["fidelity"] + r["off_mode"] == pytest.approx(1.0)


def test_transitions_script_measures_bands_and_crossings_and_loads_deeper_weights(
    quick_teacher, world, tmp_path, monkeypatch
):
    path, config = quick_teacher
    transitions = instrument("transitions")
    common_module = _common
    monkeypatch.setattr(common_module, "world_and_config", lambda args: (world, config))
    common = [
        "--world",
        "quick",
        "--cache_dir",
        str(path.parent),
        "--num_samples",
        "16",
        "--max_lines",
        "3",
        "--half_length",
        "1.0",
        "--spacing",
        "0.25",
        "--circles",
        "2",
        "--circle_points",
        "24",
    ]
    with pytest.raises(SystemExit):
        transitions.parse_args(["--circles", "9", "--num_samples", "16"])  # a circle takes two noises
    with pytest.raises(SystemExit, match="holds no generator"):
        transitions.main(transitions.parse_args([str(tmp_path / "weights.bin"), *common]))
    # Weights saved from a deepened copy of the teacher (copies start as identities) load into a network as deep as
    # the file says and compute the teacher's one-step function: the untrained generator's row.
    deeper = tmp_path / "deeper.safetensors"
    model = PixArtTransformer2DModel.from_pretrained(path / "transformer")
    common_module.save_weights(common_module.deepen(model, 2), deeper)
    out = tmp_path / "rows.json"
    rows = transitions.main(
        transitions.parse_args([str(deeper), "--untrained", "--teacher_steps", "2", *common, "--out", str(out)])
    )
    assert list(rows) == ["teacher 2 steps", "untrained one-step generator", str(deeper)]
    assert rows[str(deeper)] == pytest.approx(rows["untrained one-step generator"], nan_ok=True)
    assert json.loads(out.read_text())["rows"].keys() == rows.keys()
    for row in rows.values():
        assert 0.0 <= row["fidelity"] <= 1.0 and 0.0 <= row["circle_off_mode"] <= 1.0
        assert row["band_fraction"] <= row["circle_off_mode"]  # band points are some of the off-mode points
        if row["num_lines"]:
            assert row["median_max_slope"] > 0 and 0.0 <= row["censored"] <= 1.0
    # A K-step pipeline folder is measured as a K-step map (its own timesteps), unlike the one-step generator.
    from sim_diffusers import SIMOneStepPipeline

    two_step = tmp_path / "two_step"
    SIMOneStepPipeline.from_teacher(path, generator_timesteps=[440, 220]).save_pretrained(two_step)
    rows = transitions.main(transitions.parse_args([str(two_step), "--untrained", "--teacher_steps", "2", *common]))
    assert rows[str(two_step)] != pytest.approx(rows["untrained one-step generator"], nan_ok=True)
