"""The trainer's validation against the teacher (sim_diffusers.training.validation) end to end, on a tiny run that
collapses by construction, and the early checks of its options.

The collapsing teacher: the tiny fixture with its output projection zeroed, so that it predicts eps = 0 everywhere.
Its probability-flow ODE then keeps x_t / alpha_t constant, and DPM-Solver++ carries each noise z to z / alpha_T (T
the first solver timestep, 999), while the one-step generator copied from it returns (sigma_t* / alpha_t*) z. So the
generator has exactly (sigma_t* / alpha_t*) alpha_T (about 0.016) of the teacher's diversity: a collapse as far as the
validation can tell, known in closed form, which a tiny learning rate keeps through a few steps.

Three trainer runs (about 15 s each): 4 steps with the default `warn` action (tensorboard on); the same run with
`stop`, which stops at the first validation after step 0; and that stopped run resumed to step 4 with `warn`, whose
values must equal the uninterrupted run's, with the cached teacher samples reused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import conftest
import pytest
import torch
from conftest import describe, load_trainer_module, write_captions
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from sim_diffusers.diversity import prompt_statistics
from sim_diffusers.schedule import alpha_sigma
from sim_diffusers.training.validation import (
    COLLAPSE_EXIT_CODE,
    TEACHER_SAMPLES_FILE,
    VALIDATION_LOG_FILE,
    read_validation_log,
    validation_noise,
)

PROMPTS = ["a red cat", "a blue dog"]
SEED = 5
RUN_ARGS = [
    "--max_train_steps",
    "4",
    "--train_batch_size",
    "2",
    "--seed",
    str(SEED),
    "--regression_warmup_steps",
    "0",
    "--learning_rate",
    "1e-7",
    "--fake_score_learning_rate",
    "1e-7",
    "--checkpointing_steps",
    "100",
    "--validation_steps",
    "2",
    "--validation_prompts",
    *PROMPTS,
    "--validation_num_samples",
    "6",
    "--num_validation_images",
    "2",
    "--validation_teacher_steps",
    "5",
    "--guidance_scale",
    "1",
]
WARNING = re.compile(
    r'^warning: possible mode collapse at step (\d+): "(.+)" has (\d\.\d\d) of the teacher\'s diversity$'
)


@pytest.fixture(scope="module")
def zero_eps_teacher(tiny_teacher_path, tmp_path_factory):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.zero_()
        pipe.transformer.proj_out.bias.zero_()
    path = tmp_path_factory.mktemp("zero_eps") / "teacher"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.txt", PROMPTS + ["a green bird"])


def run(teacher, captions, out, *extra):
    return conftest.run_trainer(teacher, captions, out, *RUN_ARGS, *extra, check=False)


@pytest.fixture(scope="module")
def warn_run(zero_eps_teacher, captions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("warn") / "out"
    result = run(zero_eps_teacher, captions_file, out, "--report_to", "tensorboard")
    assert result.returncode == 0, describe(result)
    return out, result


@pytest.fixture(scope="module")
def stop_run(zero_eps_teacher, captions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("stop") / "out"
    return out, run(
        zero_eps_teacher, captions_file, out, "--report_to", "none", "--validation_collapse_action", "stop"
    )


def expected_ratio(teacher) -> float:
    """(sigma_t* / alpha_t*) alpha_999: the generator's spread over the zero-eps teacher's (module docstring)."""
    from sim_diffusers import SIMOneStepPipeline

    one_step = SIMOneStepPipeline.from_teacher(teacher)
    alphas_cumprod = one_step.scheduler.alphas_cumprod
    alpha_star, sigma_star = alpha_sigma(alphas_cumprod, torch.tensor(one_step.conditioning_timestep))
    return float(sigma_star / alpha_star * alphas_cumprod[999].sqrt())


def test_validation_log_lines_parse_and_hold_every_prompt(warn_run):
    out, _ = warn_run
    lines = (out / VALIDATION_LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2, 4]  # step 0: the untrained generator, the curves' baseline
    for record in records:
        assert list(record["prompts"]) == PROMPTS
        ratios = [record["prompts"][p]["diversity_ratio"] for p in PROMPTS]
        assert record["diversity_ratio_min"] == min(ratios)
        assert record["teacher_agreement"] == pytest.approx(
            sum(record["prompts"][p]["teacher_agreement"] for p in PROMPTS) / 2
        )
        assert record["possible_collapse"] == ([] if record["step"] == 0 else PROMPTS)
    assert "teacher_seconds" in records[0] and "teacher_seconds" not in records[1]  # computed once, at step 0


def test_the_statistics_are_the_closed_form_of_the_collapsing_teacher(warn_run, zero_eps_teacher):
    """At step 0 the validation sees the noises of `validation_noise(seed)`, the teacher's ODE samples z / alpha_T
    and the generator's (sigma*/alpha*) z: the logged values are those of `prompt_statistics` on exactly these."""
    out, _ = warn_run
    record = read_validation_log(out)[0]
    ratio = expected_ratio(zero_eps_teacher)
    assert 0.01 < ratio < 0.02
    noise = validation_noise(SEED, len(PROMPTS), 6, (4, 8, 8))
    scheduler = DDPMScheduler.from_pretrained(zero_eps_teacher, subfolder="scheduler")
    alpha_T = float(scheduler.alphas_cumprod[999].sqrt())  # the first of the teacher's DPM-Solver++ timesteps
    for p, prompt in enumerate(PROMPTS):
        logged = record["prompts"][prompt]
        assert logged["diversity_ratio"] == pytest.approx(ratio, rel=1e-4)
        expected = prompt_statistics(ratio / alpha_T * noise[p], noise[p] / alpha_T)
        assert logged["teacher_agreement"] == pytest.approx(expected["teacher_agreement"], rel=1e-4)
        assert logged["teacher_spread"] == pytest.approx(expected["teacher_spread"], rel=1e-4)
    cached = load_file(str(out / TEACHER_SAMPLES_FILE))["teacher_samples"]
    assert cached.shape == (2, 6, 4, 8, 8)
    assert torch.allclose(cached, noise / alpha_T, rtol=1e-4, atol=1e-3)


def test_a_collapse_warns_once_per_prompt_and_validation_on_stderr(warn_run):
    out, result = warn_run
    warnings = [WARNING.match(line.strip()) for line in result.stderr.splitlines() if "possible mode collapse" in line]
    assert all(warnings), result.stderr[-2000:]
    assert [(m.group(1), m.group(2)) for m in warnings] == [(s, p) for s in ("2", "4") for p in PROMPTS]
    assert all(m.group(3) == "0.02" for m in warnings)
    # warn goes on training: the final pipeline and the model card, which records the last validation
    assert (out / "model_index.json").is_file()
    card = (out / "README.md").read_text()
    assert "At step 4" in card and "| `a red cat` | 0.016 |" in card and "**minimum / mean** | **0.016**" in card
    grid = Image.open(out / "validation" / "latest.png")
    assert grid.size == (2 * 2 * 64 + 4, 2 * 64)  # per prompt a row: 2 generator images, a gap, 2 teacher images


def test_the_tracker_gets_the_scalars_and_the_side_by_side_grid(warn_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = warn_run
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"validation/diversity_ratio_min", "validation/teacher_agreement"}
    expected |= {f"validation/{k}/{p}" for k in ("diversity_ratio", "teacher_agreement") for p in PROMPTS}
    assert expected <= scalars, scalars
    assert [e.step for e in events.Scalars("validation/diversity_ratio_min")] == [0, 2, 4]
    assert "validation/generator_vs_teacher" in events.Tags()["images"]


def test_stop_saves_a_checkpoint_and_exits_with_its_own_code(stop_run):
    out, result = stop_run
    assert result.returncode == COLLAPSE_EXIT_CODE, describe(result)
    assert result.returncode not in (0, 2, 3)  # not success, not bad input, not the non-finite stop
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopping at step 2 on a possible mode collapse"), last
    assert (out / "checkpoint-2" / "training_state.json").is_file()  # --checkpointing_steps 100: saved by the stop
    assert not (out / "model_index.json").exists()  # no final pipeline from a stopped run
    assert [r["step"] for r in read_validation_log(out)] == [0, 2]


def test_resume_reuses_the_cached_teacher_samples_and_gives_identical_values(
    warn_run, stop_run, zero_eps_teacher, captions_file, tmp_path
):
    stopped, _ = stop_run
    out = tmp_path / "resumed"
    shutil.copytree(stopped, out)
    cache = out / TEACHER_SAMPLES_FILE
    cached_bytes, cached_mtime = cache.read_bytes(), cache.stat().st_mtime_ns
    result = run(zero_eps_teacher, captions_file, out, "--report_to", "none", "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, describe(result)
    assert "reusing the teacher's samples" in result.stderr
    assert cache.read_bytes() == cached_bytes and cache.stat().st_mtime_ns == cached_mtime
    reference, _ = warn_run
    resumed, uninterrupted = read_validation_log(out), read_validation_log(reference)
    assert [r["step"] for r in resumed] == [0, 2, 4]
    for a, b in zip(resumed, uninterrupted):
        assert a["prompts"] == b["prompts"], a["step"]  # bit-exact: same weights, same noise, same teacher samples


# ---------------------------------------------------------------------------------------------------------------------
# Bad option values: one `error:` line before any model loads

BAD_OPTIONS = [  # (id, overrides of the base options, the error's pattern)
    (
        "action",
        {"--validation_collapse_action": "halt"},
        r"Unknown --validation_collapse_action 'halt'; choose one of warn, stop",
    ),
    (
        "threshold above 1",
        {"--validation_collapse_threshold": "1.5"},
        r"Need 0 <= --validation_collapse_threshold < 1 .*got 1.5",
    ),
    (
        "negative threshold",
        {"--validation_collapse_threshold": "-0.1"},
        r"Need 0 <= --validation_collapse_threshold < 1 .*got -0.1",
    ),
    ("one noise", {"--validation_num_samples": "1"}, r"--validation_num_samples must be >= 2 .*got 1"),
    ("no teacher steps", {"--validation_teacher_steps": "0"}, r"--validation_teacher_steps must be >= 1, got 0"),
    ("validation every 0 steps", {"--validation_steps": "0"}, r"--validation_steps must be >= 1, got 0"),
    (
        "more images than noises",
        {"--num_validation_images": "40"},
        r"Need 1 <= --num_validation_images <= --validation_num_samples \(32\), got 40",
    ),
    (
        "repeated prompt",
        {"--validation_prompts": ["a cat", "a dog", "a cat"]},
        r"--validation_prompts repeats 'a cat'; give each prompt",
    ),
    (
        "stop without prompts",
        {"--validation_prompts": None, "--validation_collapse_action": "stop"},
        r"--validation_collapse_action stop needs --validation_prompts",
    ),
]


@pytest.mark.parametrize("overrides, pattern", [row[1:] for row in BAD_OPTIONS], ids=[row[0] for row in BAD_OPTIONS])
def test_bad_validation_options_fail_with_one_line(
    tiny_teacher_path, captions_file, overrides, pattern, tmp_path, capsys
):
    options = {"--validation_prompts": ["a cat", "a dog"], **overrides}
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny_teacher_path),
        "--caption_file",
        str(captions_file),
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
    ]
    for option, value in options.items():
        if value is not None:
            argv += [option, *value] if isinstance(value, list) else [option, value]
    trainer = load_trainer_module()
    code = trainer.main(trainer.parse_args(argv))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(pattern, captured.err), captured.err
    assert captured.out == "" and not Path(tmp_path / "out").exists()


def test_stop_under_two_processes_stops_every_rank_together(zero_eps_teacher, captions_file, tmp_path):
    """Only the main process validates; the decision is broadcast, so no rank trains on (or waits) alone. Under
    `accelerate launch` the launcher reports its own failure code and names the child's exit code."""
    out = tmp_path / "ddp"
    result = conftest.run_trainer(
        zero_eps_teacher,
        captions_file,
        out,
        *RUN_ARGS,
        "--report_to",
        "none",
        "--validation_collapse_action",
        "stop",
        processes=2,
        check=False,
    )
    assert result.returncode != 0
    assert f"exitcode: {COLLAPSE_EXIT_CODE}" in result.stderr, describe(result)
    assert "error: stopping at step 2 on a possible mode collapse" in result.stderr
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]  # both ranks took part in the stop's checkpoint
