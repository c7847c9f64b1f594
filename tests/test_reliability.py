"""Reliability of the trainer: crash-safe resume, the non-finite guard, early input checks, secrets, formats.

Trainer subprocesses on the tiny fixture cost ~15 s each (mostly imports), so there are six, in module-scoped
fixtures whose outputs several tests read: an uninterrupted run, the same run killed three times and resumed, and a
run with injected NaN losses. Input checks run in-process through the script's `main()` and take well under a second.
Faults are injected through SIM_DIFFUSERS_TEST_FAULTS (sim_diffusers/training/faults.py), which SIGKILLs the trainer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import conftest
import pytest
import torch
from conftest import TRAINER_SCRIPT, describe, load_trainer_module, write_captions
from safetensors.torch import load_file

from sim_diffusers.training import checkpointing, hub

TOKEN = "hf_TESTtoken123secret"
CAPTIONS = ["a red cat", "a blue dog", "a green bird", "a small house", "a big tree"]
# Same arguments for the uninterrupted run and every piece of the interrupted one. The upload fails (offline) so that
# the token is really in play; tensorboard event files are among the files searched for it.
RUN_ARGS = [
    "--max_train_steps",
    "6",
    "--train_batch_size",
    "2",
    "--checkpointing_steps",
    "2",
    "--checkpoints_total_limit",
    "2",
    "--report_to",
    "tensorboard",
    "--push_to_hub",
    "--hub_model_id",
    "me/sim-tiny",
    "--hub_token",
    TOKEN,
]


def run_trainer(teacher, captions, output_dir, args, faults=""):
    return conftest.run_trainer(teacher, captions, output_dir, *args, faults=faults, check=False)


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.txt", CAPTIONS)


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher_path, captions_file, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run_trainer(tiny_teacher_path, captions_file, output_dir, RUN_ARGS)
    assert result.returncode == 0, describe(result)
    return output_dir, [result]


@pytest.fixture(scope="module")
def interrupted(tiny_teacher_path, captions_file, tmp_path_factory):
    """The same run, SIGKILLed while writing checkpoint-4, inside step 5 (0-based), and while saving the pipeline;
    each time resumed with `--resume_from_checkpoint latest`."""
    output_dir = tmp_path_factory.mktemp("interrupted") / "out"
    resume = RUN_ARGS + ["--resume_from_checkpoint", "latest"]
    results = []
    for faults in ("kill:checkpoint@4", "kill:step@5", "kill:final_save@0", ""):
        results.append(run_trainer(tiny_teacher_path, captions_file, output_dir, resume, faults))
    for result in results[:3]:
        assert result.returncode == -signal.SIGKILL, describe(result)
    assert results[3].returncode == 0, describe(results[3])
    return output_dir, results


@pytest.fixture(scope="module")
def nonfinite(tiny_teacher_path, captions_file, tmp_path_factory):
    """NaN generator losses at step 1 (alone: skipped) and steps 3, 4, 5 (three in a row: the run stops)."""
    output_dir = tmp_path_factory.mktemp("nonfinite") / "out"
    args = [
        "--max_train_steps",
        "8",
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        "--max_consecutive_nonfinite_steps",
        "3",
    ]
    return output_dir, run_trainer(tiny_teacher_path, captions_file, output_dir, args, "nan:generator_loss@1,3,4,5")


def safetensors_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Kill and resume: the same weights as a run that was never interrupted


def test_resume_after_kills_gives_the_weights_of_an_uninterrupted_run(uninterrupted, interrupted):
    reference, _ = uninterrupted
    resumed, _ = interrupted
    # Per-sample randomness comes from (seed, position) and Accelerate restores optimisers and schedules: bit-exact.
    compared = [
        "transformer/diffusion_pytorch_model.safetensors",
        "checkpoint-6/generator/diffusion_pytorch_model.safetensors",
        "checkpoint-6/fake_score/diffusion_pytorch_model.safetensors",
    ]
    for name in compared:
        expected, actual = load_file(reference / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs after resuming"
    assert safetensors_files(reference).keys() == safetensors_files(resumed).keys()
    assert json.loads((reference / "checkpoint-6" / "training_state.json").read_text()) == json.loads(
        (resumed / "checkpoint-6" / "training_state.json").read_text()
    )
    # --checkpoints_total_limit 2 held in both, across the kills.
    assert checkpointing.complete_checkpoints(reference) == [reference / "checkpoint-4", reference / "checkpoint-6"]
    assert checkpointing.complete_checkpoints(resumed) == [resumed / "checkpoint-4", resumed / "checkpoint-6"]
    assert not [name for name in os.listdir(resumed) if name.startswith(checkpointing.TMP_PREFIX)]


def test_generator_trained_at_all(uninterrupted, tiny_teacher_path):
    """Guards the equality test above against comparing two untouched copies of the teacher."""
    reference, _ = uninterrupted
    teacher = load_file(Path(tiny_teacher_path) / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(reference / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[k], trained[k]) for k in teacher if k in trained)


def test_kill_during_checkpoint_write_leaves_a_temporary_folder_that_latest_ignores(interrupted):
    resumed, results = interrupted
    killed, next_run = results[0], results[1]
    assert "checkpoint-2" in killed.listing and ".tmp-checkpoint-4" in killed.listing
    assert "checkpoint-4" not in killed.listing
    # The next run resolved `latest` while .tmp-checkpoint-4 was still there.
    assert f"Resuming from {resumed / 'checkpoint-2'}" in next_run.stdout + next_run.stderr
    # Accelerate's weights_only loading of its own pickles worked (it would only log a failure for the RNG states).
    assert "All random states loaded successfully" in next_run.stdout + next_run.stderr
    assert "Could not load random states" not in next_run.stdout + next_run.stderr


def test_kill_during_a_step_resumes_from_the_last_checkpoint(interrupted):
    resumed, results = interrupted
    killed, next_run = results[1], results[2]
    assert "checkpoint-4" in killed.listing and "checkpoint-6" not in killed.listing
    assert f"Resuming from {resumed / 'checkpoint-4'}" in next_run.stdout + next_run.stderr


def test_kill_during_final_save_never_leaves_half_a_pipeline(interrupted):
    _, results = interrupted
    killed, last = results[2], results[3]
    assert "model_index.json" not in killed.listing  # no previous pipeline: none at all, not half of one
    assert not {"transformer", "vae", "text_encoder"} & set(killed.listing)
    assert "checkpoint-6" in killed.listing
    assert "model_index.json" in last.listing


def test_upload_failure_leaves_a_complete_pipeline_and_prints_the_retry_command(uninterrupted):
    from sim_diffusers import SIMOneStepPipeline

    output_dir, (result,) = uninterrupted
    retry = f"Retry with: python -m sim_diffusers.training.hub {output_dir} --hub_model_id me/sim-tiny"
    assert retry in result.stderr
    assert "Traceback" not in result.stderr
    SIMOneStepPipeline.from_pretrained(output_dir)  # complete and loadable


# ---------------------------------------------------------------------------------------------------------------------
# 2. Non-finite losses: skipped and counted; too many in a row stop the run; weights stay finite


def test_nan_losses_are_skipped_counted_and_stop_the_run_when_consecutive(nonfinite):
    output_dir, result = nonfinite
    assert result.returncode == 3, describe(result)
    assert "3 consecutive non-finite steps, the last at step 5" in result.stderr
    assert f"Last good checkpoint: {output_dir / 'checkpoint-4'}" in result.stderr
    assert "Traceback" not in result.stderr
    states = {n: json.loads((output_dir / f"checkpoint-{n}" / "training_state.json").read_text()) for n in (2, 4)}
    assert states[2]["skipped"] == {"generator": 1, "fake_score": 0}  # step 1
    assert states[4]["skipped"] == {"generator": 2, "fake_score": 0}  # steps 1 and 3
    assert states[4]["consecutive_bad"] == 1
    assert "checkpoint-6" not in result.listing and "model_index.json" not in result.listing


def test_weights_and_optimizer_states_stay_finite_through_nan_steps(nonfinite):
    output_dir, _ = nonfinite
    for checkpoint in checkpointing.complete_checkpoints(output_dir):
        for name, path in safetensors_files(checkpoint).items():
            for key, tensor in load_file(path).items():
                assert torch.isfinite(tensor).all(), f"{checkpoint.name}/{name}: {key}"
        for optimizer in checkpoint.glob("optimizer*.bin"):
            for param_state in torch.load(optimizer, weights_only=True)["state"].values():
                for key, value in param_state.items():
                    assert torch.isfinite(torch.as_tensor(value)).all(), f"{optimizer}: {key}"


# ---------------------------------------------------------------------------------------------------------------------
# 3. Bad input: exit 2, one line naming the problem, no traceback, before any model is loaded


@pytest.fixture(scope="module")
def trainer():
    return load_trainer_module()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_teacher_path):
    """Files for the table below, by name."""
    root = tmp_path_factory.mktemp("bad_inputs")
    write_captions(root / "caps.txt", CAPTIONS)
    (root / "empty.txt").write_bytes(b"")
    (root / "folder.txt").mkdir()
    (root / "broken.txt").symlink_to(root / "gone.txt")
    (root / "caps.csv").write_text("prompt,id\na red cat,1\na blue dog,2\n", encoding="utf-8")
    (root / "caps.jsonl").write_text(
        '{"prompt": "a red cat", "id": 1}\n{"prompt": "a blue dog", "id": 2}\n', encoding="utf-8"
    )
    (root / "blank.jsonl").write_text('{"prompt": "  "}\n{"prompt": ""}\n{"prompt": null}\n', encoding="utf-8")
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") + b"\xff\xfe bad\n")
    (root / "mixed.txt").write_bytes(b"a red cat\n" + "café\n".encode("latin-1") + b"a blue dog\n")
    sd = root / "sd-teacher"
    sd.mkdir()
    (sd / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    (root / "a-file").write_text("not a folder")
    return {"root": root, "teacher": Path(tiny_teacher_path)}


# (id, arguments replacing or adding to the defaults, pattern of the error line). {root}/{teacher}: see bad_inputs.
BAD_INPUT_ROWS = [
    (
        "caption file missing",
        {"--caption_file": "{root}/missing.txt"},
        r"--caption_file \S*missing\.txt does not exist",
    ),
    ("caption file empty", {"--caption_file": "{root}/empty.txt"}, r"empty\.txt is empty"),
    ("caption file is a directory", {"--caption_file": "{root}/folder.txt"}, r"folder\.txt is a directory"),
    (
        "caption file is a broken link",
        {"--caption_file": "{root}/broken.txt"},
        r"broken\.txt is a broken link to \S*gone\.txt",
    ),
    (
        "csv column missing",
        {"--caption_file": "{root}/caps.csv", "--caption_column": "text"},
        r"'text' is not in caps\.csv; its columns are \['prompt', 'id'\]",
    ),
    (
        "jsonl column missing",
        {"--caption_file": "{root}/caps.jsonl", "--caption_column": "text"},
        r"'text' is not in caps\.jsonl; its columns are \['prompt', 'id'\]",
    ),
    (
        "captions empty after cleaning",
        {"--caption_file": "{root}/blank.jsonl", "--caption_column": "prompt"},
        r"blank\.jsonl holds no captions after cleaning \(3 entries",
    ),
    (
        "only non-UTF-8 lines",
        {"--caption_file": "{root}/latin1.txt"},
        r"latin1\.txt holds no captions .*2 line\(s\) skipped as not valid UTF-8",
    ),
    (
        "teacher is Stable Diffusion",
        {"--pretrained_model_name_or_path": "{root}/sd-teacher"},
        r"sd-teacher is a StableDiffusionPipeline \(transformer None\), not a PixArt-alpha or PixArt-Σ pipeline",
    ),
    (
        "teacher without model_index.json",
        {"--pretrained_model_name_or_path": "{teacher}/transformer"},
        r"is not a diffusers pipeline \(no model_index\.json; found "
        r"\['config\.json', 'diffusion_pytorch_model\.safetensors'\]\)",
    ),
    (
        "resolution differs from teacher",
        {"--resolution": "512"},
        r"--resolution 512 does not match the teacher, which was trained at 64 px",
    ),
    ("output_dir is a file", {"--output_dir": "{root}/a-file"}, r"--output_dir \S*a-file is a file"),
    ("batch size 0", {"--train_batch_size": "0"}, r"--train_batch_size must be >= 1, got 0"),
    ("max steps 0", {"--max_train_steps": "0"}, r"--max_train_steps must be >= 1, got 0"),
    (
        "regression every 0",
        {"--regression_every": "0"},
        r"Need --regression_loss_weight >= 0, --regression_every >= 1 .* got 1\.0, 0, 8",
    ),
    (
        "negative regression warm-up",
        {"--regression_warmup_steps": "-1"},
        r"Need --regression_warmup_steps >= 0 .* got -1, None",
    ),
    ("regression c 0", {"--regression_huber_c": "0"}, r"Need --regression_huber_c > 0, got 0\.0"),
    (
        "warm-up beta1 of 1",
        {"--regression_warmup_adam_beta1": "1"},
        r"Need 0 <= --regression_warmup_adam_beta1 < 1, got 1\.0",
    ),
    (
        "warm-up without the regression term",
        {"--regression_warmup_steps": "10", "--regression_loss_weight": "0"},
        r"--regression_warmup_steps trains on the regression term",
    ),
    ("unknown divergence", {"--divergence": "kl"}, r"Unknown --divergence 'kl'; choose one of sim, "),
    (
        "unknown tracker",
        {"--report_to": "mlflow"},
        r"Unknown --report_to 'mlflow'; choose one of tensorboard, wandb, all, none",
    ),
    (
        "xformers missing",
        {"--enable_xformers_memory_efficient_attention": None},
        r"needs xformers: pip install xformers",
    ),
    ("bitsandbytes missing", {"--use_8bit_adam": None}, r"--use_8bit_adam needs bitsandbytes"),
    ("push without token", {"--push_to_hub": None}, r"--push_to_hub needs a Hub token"),
    (
        "resume from nothing",
        {"--resume_from_checkpoint": "{root}/nowhere"},
        r"--resume_from_checkpoint \S*nowhere: no complete checkpoint there",
    ),
]


def trainer_argv(files, overrides, output_dir):
    options = {
        "--pretrained_model_name_or_path": "{teacher}",
        "--caption_file": "{root}/caps.txt",
        "--output_dir": str(output_dir),
        "--max_train_steps": "2",
        "--train_batch_size": "1",
        "--report_to": "none",
    }
    options.update(overrides)
    argv = []
    for option, value in options.items():
        argv += [option] if value is None else [option, value.format(**files)]
    return argv


@pytest.fixture
def no_hub_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not in a stored login."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens")
    )


def run_main(trainer, argv, capsys):
    """The script's main() in-process: (exit code, stdout, stderr, seconds)."""
    tic = time.perf_counter()
    code = trainer.main(trainer.parse_args(argv))
    seconds = time.perf_counter() - tic
    captured = capsys.readouterr()
    return code, captured.out, captured.err, seconds


@pytest.mark.parametrize(
    "overrides, pattern", [row[1:] for row in BAD_INPUT_ROWS], ids=[row[0] for row in BAD_INPUT_ROWS]
)
def test_bad_input_fails_fast_with_one_line(trainer, bad_inputs, overrides, pattern, tmp_path, capsys, no_hub_token):
    if "--enable_xformers_memory_efficient_attention" in overrides and importlib.util.find_spec("xformers"):
        pytest.skip("xformers is installed")
    if "--use_8bit_adam" in overrides and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    code, out, err, seconds = run_main(trainer, trainer_argv(bad_inputs, overrides, tmp_path / "out"), capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and out == ""
    assert seconds < 5, f"validation took {seconds:.1f} s"
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good


def test_non_utf8_lines_are_skipped_and_counted(trainer, bad_inputs, tmp_path, capsys, caplog):
    argv = trainer_argv(bad_inputs, {"--caption_file": "{root}/mixed.txt", "--dry_run": None}, tmp_path / "out")
    code, out, err, _ = run_main(trainer, argv, capsys)
    assert code == 0, err
    assert json.loads(out)["num_captions"] == 2
    assert "Skipped 1 line(s) of" in caplog.text and "mixed.txt that are not valid UTF-8" in caplog.text


def test_resume_latest_without_a_checkpoint_starts_fresh_and_says_so(trainer, bad_inputs, tmp_path, capsys, caplog):
    (tmp_path / "out" / ".tmp-checkpoint-4").mkdir(parents=True)  # an interrupted save is not a checkpoint
    (tmp_path / "out" / ".tmp-checkpoint-4" / checkpointing.COMPLETE_MARKER).write_text("{}")
    argv = trainer_argv(bad_inputs, {"--resume_from_checkpoint": "latest", "--dry_run": None}, tmp_path / "out")
    code, out, err, _ = run_main(trainer, argv, capsys)
    assert code == 0, err
    assert json.loads(out)["resume"] == "None"
    assert "--resume_from_checkpoint latest: no checkpoint in" in caplog.text and "starting a fresh run" in caplog.text


def test_bad_input_from_the_command_line(bad_inputs, tmp_path):
    """The real CLI: one line and exit 2 for an error; the UTF-8 skip count and the fresh start are printed."""
    base = [sys.executable, str(TRAINER_SCRIPT)]
    bad = subprocess.run(
        base + trainer_argv(bad_inputs, {"--train_batch_size": "0"}, tmp_path / "a"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr == "error: --train_batch_size must be >= 1, got 0.\n", bad.stderr
    overrides = {"--caption_file": "{root}/mixed.txt", "--resume_from_checkpoint": "latest", "--dry_run": None}
    dry = subprocess.run(
        base + trainer_argv(bad_inputs, overrides, tmp_path / "b"), capture_output=True, text=True, timeout=120
    )
    assert dry.returncode == 0, dry.stderr
    assert "Skipped 1 line(s)" in dry.stderr and "starting a fresh run" in dry.stderr and "Traceback" not in dry.stderr


# Pipeline input rows (height/width not divisible by 16, generator list of the wrong length, prompt and prompt_embeds
# both or neither, an empty prompt list) are in tests/test_pipeline.py::test_bad_input_gives_a_clear_error.


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders without the trainer


def make_checkpoint(output_dir: Path, name: str, complete: bool = True) -> Path:
    path = output_dir / name
    path.mkdir(parents=True)
    (path / "generator.safetensors").write_bytes(b"weights")
    if complete:
        (path / checkpointing.COMPLETE_MARKER).write_text(json.dumps({"step": 0}))
    return path


def test_latest_ignores_temporary_and_incomplete_checkpoints(tmp_path):
    make_checkpoint(tmp_path, "checkpoint-2")
    make_checkpoint(tmp_path, "checkpoint-10")
    make_checkpoint(tmp_path, "checkpoint-11", complete=False)  # killed before its marker was written
    make_checkpoint(tmp_path, ".tmp-checkpoint-12")  # written, never published
    make_checkpoint(tmp_path, "checkpoint-old")
    (tmp_path / "checkpoint-13").write_text("a file")
    assert checkpointing.complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]
    assert checkpointing.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name
    assert checkpointing.latest_checkpoint(tmp_path / "missing") is None


def test_commit_publishes_only_a_complete_checkpoint(tmp_path):
    tmp = make_checkpoint(tmp_path, ".tmp-checkpoint-3", complete=False)
    with pytest.raises(RuntimeError, match="incomplete"):
        checkpointing.commit_checkpoint(tmp, 3)
    (tmp / checkpointing.COMPLETE_MARKER).write_text("{}")
    assert checkpointing.commit_checkpoint(tmp, 3) == tmp_path / "checkpoint-3"
    # A re-run of the same step after a resume replaces it.
    again = make_checkpoint(tmp_path, ".tmp-checkpoint-3")
    (again / "new").write_text("")
    checkpointing.commit_checkpoint(again, 3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"] and (tmp_path / "checkpoint-3" / "new").exists()


@pytest.mark.parametrize(
    "limit, kept", [(None, [1, 2, 3, 4, 5]), (0, [1, 2, 3, 4, 5]), (1, [5]), (2, [4, 5]), (9, [1, 2, 3, 4, 5])]
)
def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path, limit, kept):
    for step in range(1, 6):
        make_checkpoint(tmp_path, f"checkpoint-{step}")
    make_checkpoint(tmp_path, "checkpoint-6", complete=False)  # not a checkpoint: neither counted nor deleted
    checkpointing.prune_checkpoints(tmp_path, limit)
    assert checkpointing.complete_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{s}" for s in kept]
    assert (tmp_path / "checkpoint-6").is_dir()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(checkpointing.TMP_PREFIX)]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from checkpoint-2 of a run that had reached 6: the new checkpoint-4 is the one to keep."""
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, f"checkpoint-{step}")
    checkpointing.prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-4")
    assert checkpointing.complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]


class _FakePipeline:
    """Writes a pipeline folder whose every file carries `version`, so a mix of two saves is detectable."""

    components = ("transformer", "vae", "scheduler")

    def __init__(self, version: str):
        self.version = version

    def save_pretrained(self, target, **_):
        target = Path(target)
        for name in self.components:
            (target / name).mkdir(parents=True)
            (target / name / "weights.safetensors").write_text(self.version)
        (target / "model_index.json").write_text(json.dumps({"version": self.version}))


class _Killed(Exception):
    pass


class _RenamesUntilKilled:
    """os.replace that performs `allowed` renames, then raises _Killed (None: never)."""

    def __init__(self, allowed: int | None):
        self.allowed, self.done, self.real = allowed, 0, os.replace

    def __call__(self, src, dst):
        if self.done == self.allowed:
            raise _Killed
        self.done += 1
        return self.real(src, dst)


def test_pipeline_save_interrupted_anywhere_is_old_or_absent_never_mixed(tmp_path, monkeypatch):
    """A crash before any rename of save_pipeline_atomically leaves the old pipeline or no model_index.json."""

    def save_over_old_pipeline(output_dir, renames):
        make_checkpoint(output_dir, "checkpoint-2")
        checkpointing.save_pipeline_atomically(_FakePipeline("old"), output_dir)
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", renames)
            try:
                checkpointing.save_pipeline_atomically(_FakePipeline("new"), output_dir)
            except _Killed:
                return False
        return True

    counter = _RenamesUntilKilled(None)
    assert save_over_old_pipeline(tmp_path / "uninterrupted", counter)
    assert counter.done >= 4  # the old index out, three components in, the new index in

    for allowed in range(counter.done):
        output_dir = tmp_path / f"killed-after-{allowed}-renames"
        assert not save_over_old_pipeline(output_dir, _RenamesUntilKilled(allowed))
        index = output_dir / "model_index.json"
        if index.exists():
            assert json.loads(index.read_text())["version"] == "old"
            for name in _FakePipeline.components:
                assert (output_dir / name / "weights.safetensors").read_text() == "old", (allowed, name)
        assert checkpointing.complete_checkpoints(output_dir) == [output_dir / "checkpoint-2"]
        # The next run clears the leftovers and saves again.
        checkpointing.clear_temporary(output_dir)
        checkpointing.save_pipeline_atomically(_FakePipeline("next"), output_dir)
        assert json.loads(index.read_text())["version"] == "next"
        assert all((output_dir / n / "weights.safetensors").read_text() == "next" for n in _FakePipeline.components)
        assert not [n for n in os.listdir(output_dir) if n.startswith(checkpointing.TMP_PREFIX)]


# ---------------------------------------------------------------------------------------------------------------------
# 4. The Hub token is never written, printed or logged; a failed upload says how to retry


def all_files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file()]


def test_no_file_or_output_of_a_run_contains_the_hub_token(uninterrupted, interrupted):
    for output_dir, results in (uninterrupted, interrupted):
        files = all_files(output_dir)
        names = {p.name for p in files}
        assert {"training_args.json", "README.md", "model_index.json"} <= names
        assert any(name.startswith("events.out.tfevents") for name in names), "no tensorboard event file was written"
        for path in files:
            assert TOKEN.encode() not in path.read_bytes(), f"{path} contains the Hub token"
        for result in results:
            assert TOKEN not in result.stdout + result.stderr
    assert "hub_token" not in json.loads((uninterrupted[0] / "training_args.json").read_text())


@pytest.fixture
def pipeline_dir(tmp_path):
    output_dir = tmp_path / "my run"  # a space: the retry command must quote it
    _FakePipeline("v").save_pretrained(output_dir)
    return output_dir


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in all_files(folder)}


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_trainer_upload_failure_prints_retry_command_not_the_token(trainer, pipeline_dir, failing, capsys, caplog):
    before = snapshot(pipeline_dir)
    error = RuntimeError(f"401 Client Error: Unauthorized (token {TOKEN})")
    args = argparse.Namespace(hub_model_id="me/sim-tiny", hub_token=TOKEN, hub_private_repo=True)
    with (
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload_folder,
    ):
        create_repo.return_value.repo_id = "me/sim-tiny"
        {"create_repo": create_repo, "upload_folder": upload_folder}[failing].side_effect = error
        trainer.push(args, pipeline_dir)
    err = capsys.readouterr().err
    assert f"error: upload to me/sim-tiny failed (RuntimeError); {pipeline_dir} is complete." in err
    assert (
        f"Retry with: python -m sim_diffusers.training.hub '{pipeline_dir}' --hub_model_id me/sim-tiny --private"
        in err
    )
    assert TOKEN not in err and TOKEN not in caplog.text
    assert snapshot(pipeline_dir) == before


def test_hub_cli_upload_failure_does_not_print_the_token(pipeline_dir, capsys, caplog):
    with mock.patch("huggingface_hub.create_repo", side_effect=RuntimeError(f"bad token {TOKEN}")):
        code = hub.main([str(pipeline_dir), "--hub_model_id", "me/sim-tiny", "--hub_token", TOKEN])
    err = capsys.readouterr().err
    assert code == 1 and "error: upload failed (RuntimeError)" in err
    assert TOKEN not in err and TOKEN not in caplog.text


def test_hub_cli_uploads_without_checkpoints(pipeline_dir):
    with (
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload_folder,
    ):
        create_repo.return_value.repo_id = "me/sim-tiny"
        assert hub.main([str(pipeline_dir), "--hub_model_id", "me/sim-tiny", "--hub_token", TOKEN, "--private"]) == 0
    assert create_repo.call_args.kwargs["private"] is True and create_repo.call_args.kwargs["token"] == TOKEN
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["token"] == TOKEN and kwargs["folder_path"] == str(pipeline_dir)
    assert "checkpoint-*" in kwargs["ignore_patterns"] and ".tmp-*" in kwargs["ignore_patterns"]


def test_hub_cli_without_a_pipeline_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sim_diffusers.training.hub", str(tmp_path), "--hub_model_id", "me/x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=conftest.REPO,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path} holds no complete pipeline (no model_index.json).\n"


# ---------------------------------------------------------------------------------------------------------------------
# 5. Weights only as safetensors; Accelerate's own pickles load with weights_only=True

ACCELERATE_STATE_FILE = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|random_states_\d+\.pkl)$")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}


def test_weights_are_safetensors_and_accelerate_state_loads_weights_only(uninterrupted, interrupted):
    from accelerate.utils import load as accelerate_load

    for output_dir, _ in (uninterrupted, interrupted):
        for path in all_files(output_dir):
            if path.suffix not in PICKLE_SUFFIXES:
                continue
            in_checkpoint = (
                checkpointing.CHECKPOINT_PATTERN.match(path.parent.name) and path.parent.parent == output_dir
            )
            assert in_checkpoint and ACCELERATE_STATE_FILE.match(path.name), f"{path} is a pickle-based file"
            if path.suffix == ".bin":  # optimiser and scheduler states: tensors and plain Python values only
                torch.load(path, weights_only=True)
            else:  # RNG states: numpy arrays too, through Accelerate's own weights_only loader and allowlist
                accelerate_load(path)
        weights = [p for p in all_files(output_dir) if p.suffix == ".safetensors"]
        assert {"transformer", "vae", "text_encoder"} <= {p.parent.name for p in weights}
        for checkpoint in checkpointing.complete_checkpoints(output_dir):
            assert {"generator", "fake_score"} <= {p.parent.name for p in checkpoint.rglob("*.safetensors")}
            assert not list(
                checkpoint.glob("custom_checkpoint_*")
            )  # Accelerate unpickles those with weights_only=False


def test_regression_warmup_defaults_on_with_the_regression_term_and_off_without(trainer):
    base = ["--pretrained_model_name_or_path", "t", "--caption_file", "c.txt"]
    assert trainer.parse_args(base).regression_warmup_steps == trainer.DEFAULT_REGRESSION_WARMUP_STEPS > 0
    assert (
        trainer.parse_args(base + ["--regression_loss_weight", "0"]).regression_warmup_steps == 0
    )  # plain SIM as asked
    assert trainer.parse_args(base + ["--regression_warmup_steps", "7"]).regression_warmup_steps == 7
