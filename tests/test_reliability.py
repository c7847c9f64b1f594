"""Reliability of the trainer: crash-safe resume, the non-finite guard, early input checks, secrets, formats; and
nothing of the user's overwritten, resumes that mean what they say, no exit 0 with a broken model.

Trainer subprocesses on the tiny fixture cost ~5 s each (mostly imports), so there are few, in module-scoped fixtures
whose outputs several tests read: an uninterrupted run, the same run killed three times and resumed, a run with
injected NaN losses, a run rolled back and resumed (with its uninterrupted reference), three runs that must not save a
broken model, and one terminated run. Input and resume checks run in-process through the script's `main()`, one row
of a table each, and take well under a second. Faults are injected through SIM_DIFFUSERS_TEST_FAULTS
(sim_diffusers/training/faults.py): SIGKILL, NaN losses, NaN weights before a save.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
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
    expected_state, actual_state = (
        json.loads((d / "checkpoint-6" / "training_state.json").read_text()) for d in (reference, resumed)
    )
    # The run record differs only where the two runs do: their output folders and the resume option.
    expected_run, actual_run = expected_state.pop("run"), actual_state.pop("run")
    assert expected_state == actual_state
    differing = {k for k in expected_run["arguments"] if expected_run["arguments"][k] != actual_run["arguments"][k]}
    assert differing == {"output_dir", "resume_from_checkpoint"}
    assert {k: v for k, v in expected_run.items() if k != "arguments"} == {
        k: v for k, v in actual_run.items() if k != "arguments"
    }
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
    teacher = Path(tiny_teacher_path)
    # Teachers with one thing wrong each (copies of the tiny one), and one that is fine for the output-folder rows.
    copy_teacher(teacher, root / "teacher-copy")
    (root / "teacher-link").symlink_to(root / "teacher-copy")
    shutil.rmtree(copy_teacher(teacher, root / "no-tokenizer") / "tokenizer")
    (copy_teacher(teacher, root / "no-tokenizer-files") / "tokenizer" / "tokenizer.json").unlink()
    weights = copy_teacher(teacher, root / "truncated") / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    edit_json(copy_teacher(teacher, root / "no-sample-size") / "transformer" / "config.json", sample_size=None)
    (copy_teacher(teacher, root / "no-text-encoder-weights") / "text_encoder" / "model.safetensors").unlink()
    edit_json(copy_teacher(teacher, root / "no-vae") / "model_index.json", vae=[None, None])
    edit_json(copy_teacher(teacher, root / "other-text-encoder") / "text_encoder" / "config.json", d_model=64)
    # Captions that are not what they seem.
    (root / "utf16-no-bom.txt").write_bytes("a red cat\na blue dog\n".encode("utf-16-le"))
    (root / "nul.txt").write_bytes(b"a red cat\n\0\0\na blue dog\n")
    (root / "bad-utf16.txt").write_bytes(codecs.BOM_UTF16_LE + "a red cat\n".encode("utf-16-le") + b"x")
    (root / "open-quote.csv").write_text('prompt,id\na red cat,1\n"a blue dog,2\na green bird,3\n', encoding="utf-8")
    (root / "comma.csv").write_text("prompt,id\na red cat, sitting,1\na blue dog,2\n", encoding="utf-8")
    (root / "numbers.jsonl").write_text(
        "".join(json.dumps({"prompt": i}) + "\n" for i in range(999)) + '{"prompt": "a red cat"}\n', encoding="utf-8"
    )
    (root / "numbers.csv").write_text("prompt\n" + "".join(f"{i}\n" for i in range(9)) + "a red cat\n")
    (root / "user-folder").mkdir()
    (root / "user-folder" / "README.md").write_text("my notes")
    return {"root": root, "teacher": teacher}


def copy_teacher(teacher: Path, target: Path) -> Path:
    shutil.copytree(teacher, target)
    return target


def edit_json(path: Path, **changes) -> None:
    """Set (or, with None, remove) keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data.pop(key) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))


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
        r"blank\.jsonl \(column 'prompt'\) holds no captions after cleaning \(3 entries: 2 empty, 1 null\)",
    ),
    (
        "only non-UTF-8 lines",
        {"--caption_file": "{root}/latin1.txt"},
        r"latin1\.txt holds no captions after cleaning \(2 entries: 2 not valid UTF-8\)",
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
    ("regression every 0", {"--regression_every": "0"}, r"--regression_every must be >= 1, got 0\."),
    (
        "negative regression warm-up",
        {"--regression_warmup_steps": "-1"},
        r"--regression_warmup_steps must be >= 0, got -1\.",
    ),
    ("regression c 0", {"--regression_huber_c": "0"}, r"--regression_huber_c must be a finite number > 0, got 0\.0"),
    (
        "warm-up beta1 of 1",
        {"--regression_warmup_adam_beta1": "1"},
        r"--regression_warmup_adam_beta1 must be a finite number in \[0, 1\), got 1\.0",
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
    # Case 1: an output folder that is, lies inside or contains the teacher (links resolved).
    (
        "output_dir is the teacher",
        {"--pretrained_model_name_or_path": "{root}/teacher-copy", "--output_dir": "{root}/teacher-copy"},
        r"--output_dir \S*teacher-copy is the teacher's folder .* Give a folder apart from it",
    ),
    (
        "output_dir is a link to the teacher",
        {"--pretrained_model_name_or_path": "{root}/teacher-copy", "--output_dir": "{root}/teacher-link"},
        r"--output_dir \S*teacher-link is the teacher's folder \(\S*teacher-copy\)",
    ),
    (
        "output_dir inside the teacher",
        {"--pretrained_model_name_or_path": "{root}/teacher-link", "--output_dir": "{root}/teacher-copy/sim"},
        r"--output_dir \S*teacher-copy/sim lies inside the teacher's folder",
    ),
    (
        "output_dir contains the teacher",
        {"--pretrained_model_name_or_path": "{root}/teacher-copy", "--output_dir": "{root}"},
        r"--output_dir \S* contains the teacher's folder",
    ),
    (
        "output_dir holds someone else's files",
        {"--output_dir": "{root}/user-folder"},
        r"--output_dir \S*user-folder already holds README\.md, not written by this trainer",
    ),
    # Case 5 and the weak group: every numeric option range-checked, non-finite values included.
    (
        "learning rate inf",
        {"--learning_rate": "inf"},
        r"--learning_rate must be a finite number in \(0, 1\], got inf\.",
    ),
    ("learning rate nan", {"--learning_rate": "nan"}, r"--learning_rate must be a finite number in \(0, 1\], got nan"),
    ("learning rate 0", {"--learning_rate": "0"}, r"--learning_rate must be a finite number in \(0, 1\], got 0\.0"),
    ("learning rate 2", {"--learning_rate": "2"}, r"--learning_rate must be a finite number in \(0, 1\], got 2\.0"),
    (
        "fake-score learning rate negative",
        {"--fake_score_learning_rate=-1e-4": None},
        r"--fake_score_learning_rate must be a finite number in \(0, 1\], got -0\.0001",
    ),
    (
        "warm-up learning rate inf",
        {"--regression_warmup_learning_rate": "inf"},
        r"--regression_warmup_learning_rate must be a finite number in \(0, 1\], got inf",
    ),
    ("guidance nan", {"--guidance_scale": "nan"}, r"--guidance_scale must be a finite number >= 0, got nan"),
    ("guidance negative", {"--guidance_scale": "-1"}, r"--guidance_scale must be a finite number >= 0, got -1\.0"),
    ("checkpointing every 0 steps", {"--checkpointing_steps": "0"}, r"--checkpointing_steps must be >= 1, got 0\."),
    ("validating every 0 steps", {"--validation_steps": "0"}, r"--validation_steps must be >= 1, got 0\."),
    ("no validation images", {"--num_validation_images": "0"}, r"--num_validation_images must be >= 1, got 0\."),
    (
        "stop after 0 non-finite steps",
        {"--max_consecutive_nonfinite_steps": "0"},
        r"--max_consecutive_nonfinite_steps must be >= 1, got 0\.",
    ),
    ("sequence length 0", {"--max_sequence_length": "0"}, r"--max_sequence_length must be >= 1, got 0\."),
    ("seed -1", {"--seed": "-1"}, r"--seed must be >= 0, got -1\."),
    ("resolution 0", {"--resolution": "0"}, r"--resolution must be >= 1, got 0\."),
    ("accumulation 0", {"--gradient_accumulation_steps": "0"}, r"--gradient_accumulation_steps must be >= 1, got 0"),
    ("warm-up steps -1", {"--lr_warmup_steps": "-1"}, r"--lr_warmup_steps must be >= 0, got -1\."),
    ("workers -1", {"--dataloader_num_workers": "-1"}, r"--dataloader_num_workers must be >= 0, got -1\."),
    ("keep 0 checkpoints", {"--checkpoints_total_limit": "0"}, r"--checkpoints_total_limit must be >= 1, got 0\."),
    (
        "max timestep 1000",
        {"--max_timestep": "1000"},
        r"--max_timestep must be <= 999 \(the teacher has 1000 training timesteps\), got 1000\.",
    ),
    ("min timestep -1", {"--min_timestep": "-1"}, r"--min_timestep must be >= 0, got -1\."),
    (
        "conditioning timestep 1000",
        {"--conditioning_timestep": "1000"},
        r"--conditioning_timestep must be <= 999 \(the teacher has 1000 training timesteps\), got 1000\.",
    ),
    ("conditioning timestep 0", {"--conditioning_timestep": "0"}, r"--conditioning_timestep must be >= 1, got 0\."),
    ("min above max timestep", {"--min_timestep": "500", "--max_timestep": "400"}, r"Need --min_timestep <= "),
    (
        "unknown lr scheduler",
        {"--lr_scheduler": "cosine_annealing"},
        r"Unknown --lr_scheduler 'cosine_annealing'; choose one of linear, cosine, ",
    ),
    ("unknown loss weighting", {"--loss_weighting": "snr"}, r"Unknown --loss_weighting 'snr'; choose one of "),
    ("negative LoRA rank", {"--fake_score_lora_rank": "-1"}, r"--fake_score_lora_rank must be >= 0, got -1\."),
    ("LoRA alpha 0", {"--fake_score_lora_alpha": "0"}, r"--fake_score_lora_alpha must be a finite number > 0, got 0"),
    ("negative huber c", {"--huber_c": "-1"}, r"--huber_c must be a finite number > 0, got -1\.0"),
    ("huber c nan", {"--huber_c": "nan"}, r"--huber_c must be a finite number > 0, got nan"),
    ("sid alpha inf", {"--sid_alpha": "inf"}, r"--sid_alpha must be a finite number, got inf"),
    ("regression weight nan", {"--regression_loss_weight": "nan"}, r"--regression_loss_weight must be a finite"),
    ("regression solver 0 steps", {"--regression_num_inference_steps": "0"}, r"--regression_num_inference_steps must"),
    ("adam epsilon 0", {"--adam_epsilon": "0"}, r"--adam_epsilon must be a finite number in \(0, 1\], got 0\.0"),
    ("adam beta2 1", {"--adam_beta2": "1"}, r"--adam_beta2 must be a finite number in \[0, 1\), got 1\.0"),
    ("weight decay -0.1", {"--adam_weight_decay": "-0.1"}, r"--adam_weight_decay must be a finite number in \[0, 1\]"),
    ("grad norm inf", {"--max_grad_norm": "inf"}, r"--max_grad_norm must be a finite number, got inf"),
    ("ema decay 1.5", {"--ema_decay": "1.5"}, r"--ema_decay must be a finite number in \[0, 1\], got 1\.5"),
    # Case 6 and the weak group: the teacher validated up front, component by component.
    (
        "teacher without a tokenizer",
        {"--pretrained_model_name_or_path": "{root}/no-tokenizer"},
        r"the teacher's tokenizer is incomplete: no tokenizer/tokenizer_config\.json in \S*no-tokenizer",
    ),
    (
        "teacher tokenizer without its vocabulary",
        {"--pretrained_model_name_or_path": "{root}/no-tokenizer-files"},
        r"the teacher's tokenizer is incomplete: no tokenizer\.json or spiece\.model",
    ),
    (
        "truncated teacher weights",
        {"--pretrained_model_name_or_path": "{root}/truncated"},
        r"the teacher's transformer/diffusion_pytorch_model\.safetensors is truncated \(\d+ bytes, its header "
        r"describes \d+\): re-download or re-save it",
    ),
    (
        "transformer config without sample_size",
        {"--pretrained_model_name_or_path": "{root}/no-sample-size"},
        r"the teacher's transformer/config\.json is not a PixArt transformer's: no integer sample_size",
    ),
    (
        "teacher without text-encoder weights",
        {"--pretrained_model_name_or_path": "{root}/no-text-encoder-weights"},
        r"the teacher's text_encoder has no safetensors weights \(text_encoder/\*\.safetensors",
    ),
    (
        "teacher weights of another variant",
        {"--variant": "fp16"},
        r"the teacher's transformer has no safetensors weights \(transformer/\*\.fp16\.safetensors",
    ),
    (
        "teacher without a VAE",
        {"--pretrained_model_name_or_path": "{root}/no-vae"},
        r"the teacher \S*no-vae has no vae \(model_index\.json names none\)",
    ),
    (
        "text encoder that does not fit the transformer",
        {"--pretrained_model_name_or_path": "{root}/other-text-encoder"},
        r"the teacher's text encoder \(d_model 64\) does not fit its transformer \(caption_channels 32\)",
    ),
    # Case 9: captions that would be corrupted or dropped silently.
    (
        "UTF-16 without a byte-order mark",
        {"--caption_file": "{root}/utf16-no-bom.txt"},
        r"utf16-no-bom\.txt has NUL bytes \(line 1\): it is not UTF-8 text \(UTF-16 without a byte-order mark\?\)",
    ),
    ("NUL-only lines", {"--caption_file": "{root}/nul.txt"}, r"nul\.txt has NUL bytes \(line 2\)"),
    (
        "broken UTF-16",
        {"--caption_file": "{root}/bad-utf16.txt"},
        r"bad-utf16\.txt starts with a UTF-16-LE byte-order mark but is not valid UTF-16-LE",
    ),
    (
        "CSV with a quote left open",
        {"--caption_file": "{root}/open-quote.csv", "--caption_column": "prompt"},
        r"open-quote\.csv is not valid CSV near line \d+: unexpected end of data \(a quote left open\?\)",
    ),
    (
        "CSV with an unquoted comma",
        {"--caption_file": "{root}/comma.csv", "--caption_column": "prompt"},
        r"comma\.csv line 2 has 3 fields, its header 2 \(a caption with a comma must be quoted\)",
    ),
    (
        "JSONL column of numbers",
        {"--caption_file": "{root}/numbers.jsonl", "--caption_column": "prompt"},
        r"numbers\.jsonl \(column 'prompt'\) holds numbers in 999 of its 1000 entries, captions in 1: is it the "
        r"caption column\?",
    ),
    (
        "CSV column of numbers",
        {"--caption_file": "{root}/numbers.csv", "--caption_column": "prompt"},
        r"numbers\.csv \(column 'prompt'\) holds numbers in 9 of its 10 entries",
    ),
    # Weak group: an invalid Hub repo id fails now, not after the run.
    (
        "invalid hub id",
        {"--push_to_hub": None, "--hub_model_id": "me/sim tiny!"},
        r"--hub_model_id 'me/sim tiny!' is not a valid Hub repo id",
    ),
    (
        "output_dir name that is no hub id",
        {"--push_to_hub": None, "--output_dir": "{root}/my run"},
        r"--output_dir's name \(the default --hub_model_id\) 'my run' is not a valid Hub repo id",
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
    before = tree_state(bad_inputs["root"])
    code, out, err, seconds = run_main(trainer, trainer_argv(bad_inputs, overrides, tmp_path / "out"), capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and out == ""
    assert seconds < 5, f"validation took {seconds:.1f} s"
    # Nothing written before the inputs are known to be good: no output folder, the teacher copies untouched.
    assert not (tmp_path / "out").exists()
    assert tree_state(bad_inputs["root"]) == before


def test_only_the_output_dir_owner_checks_it_for_strangers_files(trainer, tiny_teacher_path, tmp_path, monkeypatch):
    """Under a launcher the main process writes the run's records while the others still validate; a process that
    looked between its two writes took them for a stranger's files and exited 2 (in about one 2-process launch of
    six here). Only the main process judges output_dir."""
    from sim_diffusers.training.captions import UserInputError
    from sim_diffusers.training.checks import resolve_resume

    write_captions(tmp_path / "caps.txt", CAPTIONS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    files = {"teacher": str(tiny_teacher_path), "root": str(tmp_path)}
    args = trainer.parse_args(trainer_argv(files, {}, out))
    monkeypatch.setenv("RANK", "1")
    assert resolve_resume(args, {}, None) is None
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserInputError, match="already holds README.md"):
        resolve_resume(args, {}, None)


def tree_state(root: Path) -> dict:
    """Every path under root with its size and modification time (links not followed)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_non_utf8_lines_are_skipped_and_counted(trainer, bad_inputs, tmp_path, capsys, caplog):
    argv = trainer_argv(bad_inputs, {"--caption_file": "{root}/mixed.txt", "--dry_run": None}, tmp_path / "out")
    code, out, err, _ = run_main(trainer, argv, capsys)
    assert code == 0, err
    assert json.loads(out)["num_captions"] == 2
    assert "mixed.txt: left out 1 of 3 entries (1 not valid UTF-8); training on 2." in caplog.text


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
    assert "left out 1 of 3 entries (1 not valid UTF-8)" in dry.stderr and "starting a fresh run" in dry.stderr
    assert "Traceback" not in dry.stderr


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


# ---------------------------------------------------------------------------------------------------------------------
# 6. Resume means what it says: a rollback continues the branch chosen, `latest` included;
# changed learning rates are applied and recorded; the first run's record is kept


BRANCH_ARGS = [
    "--max_train_steps",
    "6",
    "--train_batch_size",
    "2",
    "--checkpointing_steps",
    "2",
    "--regression_warmup_steps",
    "2",
    "--report_to",
    "none",
]
NEW_RATES = ["--learning_rate", "1e-05", "--fake_score_learning_rate", "0.0001"]


@pytest.fixture(scope="module")
def branches(tiny_teacher_path, captions_file, tmp_path_factory):
    """A: a run to step 6 (checkpoints 2, 4, 6 and a pipeline). B: a rollback to checkpoint-2 with new learning
    rates, SIGKILLed inside step 4 (after its own checkpoint-4). C: the same arguments with `latest`. R: the reference,
    B's arguments resumed from A's checkpoint-2 into a fresh folder and never interrupted."""
    root = tmp_path_factory.mktemp("branches")
    out = root / "out"
    first = run_trainer(tiny_teacher_path, captions_file, out, BRANCH_ARGS)
    assert first.returncode == 0, describe(first)
    first_weights = {n: conftest.component_weights(out / f"checkpoint-{n}", "generator") for n in (4, 6)}
    first_weights["final"] = conftest.component_weights(out)
    for n in (2, 4, 6):  # as they were, for the resume checks of section 7
        shutil.copytree(out / f"checkpoint-{n}", root / "first" / f"checkpoint-{n}")
    rollback = run_trainer(
        tiny_teacher_path,
        captions_file,
        out,
        BRANCH_ARGS + NEW_RATES + ["--resume_from_checkpoint", "checkpoint-2"],
        faults="kill:step@4",
    )
    assert rollback.returncode == -signal.SIGKILL, describe(rollback)
    latest = run_trainer(
        tiny_teacher_path, captions_file, out, BRANCH_ARGS + NEW_RATES + ["--resume_from_checkpoint", "latest"]
    )
    assert latest.returncode == 0, describe(latest)
    reference = run_trainer(
        tiny_teacher_path,
        captions_file,
        root / "reference",
        BRANCH_ARGS + NEW_RATES + ["--resume_from_checkpoint", str(out / "checkpoint-2")],
    )
    assert reference.returncode == 0, describe(reference)
    return {
        "out": out,
        "reference": root / "reference",
        "first": first_weights,
        "first_checkpoints": root / "first",
        "runs": (first, rollback, latest),
    }


def history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "training_history.jsonl").read_text().splitlines()]


def test_rollback_then_latest_continues_the_chosen_branch(branches):
    out, (_, rollback, latest) = branches["out"], branches["runs"]
    assert f"Resuming from {out / 'checkpoint-2'}" in rollback.stdout + rollback.stderr
    assert "checkpoint-4" in rollback.listing and "checkpoint-6" not in rollback.listing
    # `latest` is the rolled-back branch's checkpoint-4, not the abandoned branch's checkpoint-6.
    assert f"Resuming from {out / 'checkpoint-4'}" in latest.stdout + latest.stderr
    final = conftest.component_weights(out)
    assert conftest.max_difference(final, conftest.component_weights(branches["reference"])) == 0.0
    assert conftest.max_difference(final, branches["first"]["final"]) > 0  # not the abandoned branch's weights


def test_the_abandoned_branch_is_moved_aside_with_a_record_never_deleted(branches):
    out = branches["out"]
    (folder,) = (out / "abandoned").iterdir()
    record = json.loads((folder / "abandoned.json").read_text())
    assert record["continued_from_step"] == 2 and record["moved"] == ["checkpoint-4", "checkpoint-6"]
    assert "earlier than the newest checkpoint" in record["reason"]
    for n in (4, 6):  # byte for byte the first run's
        assert (
            conftest.max_difference(
                conftest.component_weights(folder / f"checkpoint-{n}", "generator"), branches["first"][n]
            )
            == 0.0
        )
    assert [json.loads(line)["step"] for line in (folder / "steps.jsonl").read_text().splitlines()] == list(
        range(1, 7)
    )
    assert history(out)[1]["abandoned"] == str(folder.relative_to(out))
    assert checkpointing.complete_checkpoints(out) == [out / f"checkpoint-{n}" for n in (2, 4, 6)]


def test_learning_rates_changed_on_resume_are_applied_and_recorded(branches):
    out, (_, rollback, _) = branches["out"], branches["runs"]
    steps = {line["step"]: line for line in map(json.loads, (out / "logs" / "steps.jsonl").read_text().splitlines())}
    assert sorted(steps) == list(range(1, 7))
    # Steps 1-2: the first run's warm-up (10x its generator rate); steps 3-6: SIM at the new rates, not the
    # checkpoint's (Accelerate's load_state restores those).
    assert [steps[s]["lr/generator"] for s in (1, 2)] == [5e-05, 5e-05]
    assert [steps[s]["lr/fake_score"] for s in (1, 2)] == [5e-05, 5e-05]
    assert all(steps[s]["lr/generator"] == 1e-05 and steps[s]["lr/fake_score"] == 1e-04 for s in range(3, 7))
    assert "Resuming with --learning_rate 5e-06 -> 1e-05: applied from step 2 on." in rollback.stderr
    changed = history(out)[1]["changed_on_resume"]["applied"]
    assert changed["learning_rate"] == [5e-06, 1e-05] and changed["fake_score_learning_rate"] == [5e-05, 1e-04]
    assert "`learning_rate` | `1e-05`" in (out / "README.md").read_text()  # the card states what was applied


def test_the_first_runs_arguments_are_kept_and_every_run_is_recorded(branches):
    out = branches["out"]
    assert json.loads((out / "training_args.json").read_text())["learning_rate"] == 5e-06  # never rewritten
    runs = history(out)
    assert [run["start_step"] for run in runs] == [0, 2, 4]
    assert [Path(run["resumed_from"]).name if run["resumed_from"] else None for run in runs] == [
        None,
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert runs[2]["changed_on_resume"] == {"applied": {}, "accepted": {}}  # C continues B's settings
    assert all(run["arguments"]["learning_rate"] == rate for run, rate in zip(runs, (5e-06, 1e-05, 1e-05)))
    state = json.loads((out / "checkpoint-6" / "training_state.json").read_text())
    assert state["run"]["arguments"]["learning_rate"] == 1e-05 and state["run"]["global_batch_size"] == 2


def test_a_killed_runs_lock_is_taken_over_by_the_next_run(branches):
    _, rollback, latest = branches["runs"]
    assert "training.lock" in rollback.listing  # SIGKILL: nobody released it
    assert re.search(
        r"Took over the stale lock of \S*training\.lock: PID \d+ on \S+ .* is no longer running", latest.stderr
    )
    assert "training.lock" not in latest.listing  # released at the end


# ---------------------------------------------------------------------------------------------------------------------
# 7. A resume is checked before any model loads (cases 3 and the corrupt-checkpoint group): settings that change what
# is learned are refused with the list of differences, a damaged newest checkpoint is passed over, saying why


@pytest.fixture(scope="module")
def resume_inputs(branches, bad_inputs, tmp_path_factory, tiny_teacher_path):
    """Copies of the first run's checkpoints 2, 4, 6 (from the branches fixture), whole or with checkpoint-6
    damaged one way each, and teachers and captions that differ from the run's or do not."""
    root = tmp_path_factory.mktemp("resume_inputs")

    def folder(name, damage=None):
        shutil.copytree(branches["first_checkpoints"], root / name)
        if damage:
            damage(root / name / "checkpoint-6")

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    folder("whole")
    folder("weights", lambda c: truncate(c / "generator" / "diffusion_pytorch_model.safetensors"))
    folder("optimizer", lambda c: truncate(c / "optimizer.bin"))
    folder("pickle", lambda c: torch.save(argparse.Namespace(payload="not a tensor"), c / "optimizer.bin"))
    folder("state", lambda c: (c / checkpointing.COMPLETE_MARKER).write_text("{"))
    folder("all")
    for n in (2, 4, 6):
        truncate(root / "all" / f"checkpoint-{n}" / "generator" / "diffusion_pytorch_model.safetensors")
    retrained = copy_teacher(Path(tiny_teacher_path), root / "teacher-retrained")
    weights = retrained / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, str(weights))  # same shapes, other values
    copy_teacher(Path(tiny_teacher_path), root / "teacher-moved")
    write_captions(root / "other.txt", CAPTIONS + ["a yellow fish"])
    return {
        "root": root,
        "teacher": Path(tiny_teacher_path),
        "relative_teacher": os.path.relpath(tiny_teacher_path),
        "captions": bad_inputs["root"] / "caps.txt",
    }


# (id, folder, arguments replacing or adding to the run's, expected): ("resume", checkpoint, pattern of the log or
# None) or ("error", pattern of the one error line). Every row is a dry run: it must change nothing on disk.
RESUME_ROWS = [
    ("same settings", "whole", {}, ("resume", "checkpoint-6", None)),
    (
        "seed changed",
        "whole",
        {"--seed": "1"},
        (
            "error",
            r"--resume_from_checkpoint checkpoint-6 was trained with other settings: --seed 0 -> 1; resume with the "
            r"same, or pass --allow_changed_arguments to apply these\.",
        ),
    ),
    ("global batch changed", "whole", {"--train_batch_size": "4"}, ("error", r"global batch size 2 -> 4;")),
    (
        "same global batch, split differently",
        "whole",
        {"--train_batch_size": "1", "--gradient_accumulation_steps": "2"},
        ("resume", "checkpoint-6", None),
    ),
    ("guidance changed", "whole", {"--guidance_scale": "3"}, ("error", r"--guidance_scale 4\.5 -> 3\.0;")),
    ("objective changed", "whole", {"--divergence": "sid"}, ("error", r"--divergence sim -> sid;")),
    (
        "another teacher of the same shape",
        "whole",
        {"--pretrained_model_name_or_path": "{root}/teacher-retrained"},
        ("error", r"teacher content sha256:\w{12}\.\.\. -> sha256:\w{12}\.\.\.;"),
    ),
    (
        "the same teacher copied elsewhere",
        "whole",
        {"--pretrained_model_name_or_path": "{root}/teacher-moved"},
        ("resume", "checkpoint-6", None),
    ),
    (
        "the same teacher by a relative path",
        "whole",
        {"--pretrained_model_name_or_path": "{relative_teacher}"},
        ("resume", "checkpoint-6", None),
    ),
    ("other captions", "whole", {"--caption_file": "{root}/other.txt"}, ("error", r"caption content sha256:")),
    (
        "seed changed and accepted",
        "whole",
        {"--seed": "1", "--allow_changed_arguments": None},
        ("resume", "checkpoint-6", None),
    ),
    (
        "EMA switched on",
        "whole",
        {"--use_ema": None},
        ("error", r"checkpoint-6: --use_ema False -> True cannot change on resume"),
    ),
    (
        "t* changed",
        "whole",
        {"--conditioning_timestep": "500"},
        ("error", r"--conditioning_timestep None -> 500 cannot change on resume"),
    ),
    ("new learning rate", "whole", {"--learning_rate": "2e-5"}, ("resume", "checkpoint-6", None)),
    (
        "fewer steps than the checkpoint's",
        "whole",
        {"--max_train_steps": "4"},
        ("error", r"--max_train_steps 4 is below the step of checkpoint-6; raise it to train on\."),
    ),
    (
        "an earlier checkpoint named",
        "whole",
        {"--resume_from_checkpoint": "checkpoint-2"},
        ("resume", "checkpoint-2", None),
    ),
    (
        "truncated weights in the newest",
        "weights",
        {},
        (
            "resume",
            "checkpoint-4",
            r"checkpoint-6 cannot be resumed from: generator/diffusion_pytorch_model\.safetensors is truncated .*"
            r"Falling back to checkpoint-4, the newest readable checkpoint",
        ),
    ),
    (
        "truncated optimiser state in the newest",
        "optimizer",
        {},
        ("resume", "checkpoint-4", r"optimizer\.bin is unreadable"),
    ),
    (
        "unsafe pickle in the newest",
        "pickle",
        {},
        ("resume", "checkpoint-4", r"optimizer\.bin holds objects that are not plain tensors, refused unread"),
    ),
    (
        "unsafe pickle named",
        "pickle",
        {"--resume_from_checkpoint": "checkpoint-6"},
        ("error", r"checkpoint-6: cannot be resumed from: optimizer\.bin holds objects that are not plain tensors"),
    ),
    (
        "unreadable state file in the newest",
        "state",
        {},
        ("resume", "checkpoint-4", r"training_state\.json is unreadable"),
    ),
    (
        "nothing readable",
        "all",
        {},
        ("error", r"--resume_from_checkpoint latest: no checkpoint in \S*all can be read\."),
    ),
]


@pytest.mark.parametrize("folder, overrides, expected", [r[1:] for r in RESUME_ROWS], ids=[r[0] for r in RESUME_ROWS])
def test_resume_is_checked_before_any_model_loads(trainer, resume_inputs, folder, overrides, expected, capsys, caplog):
    options = {
        "--pretrained_model_name_or_path": str(resume_inputs["teacher"]),
        "--caption_file": str(resume_inputs["captions"]),
        "--output_dir": str(resume_inputs["root"] / folder),
        "--resume_from_checkpoint": "latest",
        "--dry_run": None,
        **dict(zip(BRANCH_ARGS[::2], BRANCH_ARGS[1::2])),
        **overrides,
    }
    argv = []
    for option, value in options.items():
        argv += [option] if value is None else [option, value.format(**resume_inputs)]
    before = tree_state(resume_inputs["root"])
    code, out, err, seconds = run_main(trainer, argv, capsys)
    kind, *detail = expected
    if kind == "error":
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(detail[0], err), err
    else:
        assert code == 0, err
        assert json.loads(out)["resume"] == str(resume_inputs["root"] / folder / detail[0])
        if detail[1]:
            assert re.search(detail[1], caplog.text, re.S), caplog.text
    assert "weights_only=False" not in err + caplog.text  # torch's advice for a refused pickle is not passed on
    assert seconds < 5, f"checks took {seconds:.1f} s"
    assert tree_state(resume_inputs["root"]) == before  # a dry run moves and writes nothing


def test_a_fallback_sets_the_unreadable_checkpoint_aside(resume_inputs, tmp_path):
    """What the run itself does once the lock is held: the unreadable checkpoint-6 is moved aside with the reason."""
    from types import SimpleNamespace

    from sim_diffusers.training import lineage
    from sim_diffusers.training.captions import CaptionSet

    out = tmp_path / "out"
    shutil.copytree(resume_inputs["root"] / "weights", out)
    args = SimpleNamespace(output_dir=str(out), train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-5)
    facts = {"fingerprint": {"teacher": "sha256:x"}}
    with lineage.claim_output_dir(args, out / "checkpoint-4", facts, CaptionSet(CAPTIONS)):
        assert (out / "training.lock").is_file()
    assert not (out / "training.lock").exists()
    (folder,) = (out / "abandoned").iterdir()
    record = json.loads((folder / "abandoned.json").read_text())
    assert record["moved"] == ["checkpoint-6"] and "checkpoint-6 cannot be read (generator/" in record["reason"]
    assert checkpointing.complete_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-4"]


# ---------------------------------------------------------------------------------------------------------------------
# 8. The T5 embedding cache follows its text encoder's content, not its path (case 4)


class _OneProcess:
    """The few Accelerator members load_text_conditioning uses, for one CPU process."""

    device, process_index, num_processes, is_local_main_process = torch.device("cpu"), 0, 1, False

    def wait_for_everyone(self):
        pass


def test_the_embedding_cache_follows_the_text_encoders_content_not_its_path(
    trainer, tiny_teacher_path, tmp_path, monkeypatch
):
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import save_file

    from sim_diffusers.training import checks, run
    from sim_diffusers.training.captions import CaptionSet, UserInputError

    teacher = copy_teacher(Path(tiny_teacher_path), tmp_path / "teacher")
    args = trainer.parse_args(
        ["--pretrained_model_name_or_path", str(teacher), "--caption_file", "unused.txt"]
        + ["--text_embedding_cache", str(tmp_path / "cache"), "--max_sequence_length", "120"]
    )
    pipe = PixArtAlphaPipeline.from_pretrained(teacher)
    captions = CaptionSet(CAPTIONS)
    run.load_text_conditioning(args, _OneProcess(), pipe, CAPTIONS, torch.float32)
    built = (tmp_path / "cache" / "index.json").stat().st_mtime_ns

    # The same teacher by a relative path: the cache is reused, early check and build alike.
    monkeypatch.chdir(tmp_path)
    args.pretrained_model_name_or_path = "teacher"
    checks.check_text_embedding_cache(args, captions)
    run.load_text_conditioning(args, _OneProcess(), pipe, CAPTIONS, torch.float32)
    assert (tmp_path / "cache" / "index.json").stat().st_mtime_ns == built

    # A new transformer leaves the text side, and the cache, valid.
    weights = teacher / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, str(weights))
    checks.check_text_embedding_cache(args, captions)

    # T5 retrained in place, same shapes and path: refused before any model loads, and at the build.
    weights = teacher / "text_encoder" / "model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    message = r"--text_embedding_cache \S*cache does not match: it was built with another text encoder \(by content\)"
    with pytest.raises(UserInputError, match=message):
        checks.check_text_embedding_cache(args, captions)
    with pytest.raises(UserInputError, match=message):
        run.load_text_conditioning(args, _OneProcess(), pipe, CAPTIONS, torch.float32)
    with pytest.raises(UserInputError, match="it was built for other captions"):
        checks.check_text_embedding_cache(args, CaptionSet(CAPTIONS[:2]))


# ---------------------------------------------------------------------------------------------------------------------
# 9. No exit 0 with a broken model (case 5): a generator that never took a finite update, non-finite weights before
# a checkpoint or before the final save: exit 3, one line naming the last good checkpoint, nothing non-finite saved


@pytest.fixture(scope="module")
def broken_runs(tiny_teacher_path, captions_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    args = ["--train_batch_size", "2", "--checkpointing_steps", "2", "--report_to", "none"]
    runs = {
        "never trained": (["--max_train_steps", "4"], "nan:generator_loss@0,1,2,3"),
        "weights at a checkpoint": (["--max_train_steps", "6"], "nan:generator_weights@4"),
        "weights at the end": (["--max_train_steps", "4"], "nan:final_weights@0"),
    }
    return {
        name: (
            root / name.replace(" ", "-"),
            run_trainer(tiny_teacher_path, captions_file, root / name.replace(" ", "-"), args + extra, faults),
        )
        for name, (extra, faults) in runs.items()
    }


@pytest.mark.parametrize(
    "name, message, checkpoints",
    [
        (
            "never trained",
            r"error: The generator's update was non-finite at all 4 steps \(each skipped\): it never trained, so no "
            r"pipeline was saved; see logs/steps\.jsonl\.",
            [2, 4],
        ),
        (
            "weights at a checkpoint",
            r"error: The weights at step 4 are not finite \(e\.g\. generator\.\S+\); nothing was saved\. Last good "
            r"checkpoint: (?P<out>\S+)/checkpoint-2\.",
            [2],
        ),
        (
            "weights at the end",
            r"error: The final generator weights are not finite \(e\.g\. generator\.\S+\); nothing was saved\. Last "
            r"good checkpoint: (?P<out>\S+)/checkpoint-4\.",
            [2, 4],
        ),
    ],
)
def test_no_exit_0_with_a_broken_model(broken_runs, name, message, checkpoints):
    output_dir, result = broken_runs[name]
    assert result.returncode == 3, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(message, errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    assert "model_index.json" not in result.listing and "transformer" not in result.listing
    assert checkpointing.complete_checkpoints(output_dir) == [output_dir / f"checkpoint-{n}" for n in checkpoints]
    for checkpoint in checkpointing.complete_checkpoints(output_dir):  # what was saved is finite
        for path in checkpoint.rglob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


# ---------------------------------------------------------------------------------------------------------------------
# 10. One run at a time per output folder (case 7)


def write_lock(output_dir: Path, **record) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / "training.lock"
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01T09:00:00Z"}
    lock.write_text(json.dumps({**holder, **record}))
    return lock


@pytest.mark.parametrize("host", ["this host", "another host"])
def test_a_second_run_refuses_while_the_first_holds_the_output_dir(trainer, bad_inputs, tmp_path, capsys, host):
    out = tmp_path / "out"
    lock = write_lock(out, **({"host": "gpu-node-7"} if host == "another host" else {}))
    before = lock.read_text()
    code, _, err, seconds = run_main(trainer, trainer_argv(bad_inputs, {}, out), capsys)
    where = f"PID {os.getpid()} on host {socket.gethostname() if host == 'this host' else 'gpu-node-7'}"
    expected = f"error: --output_dir {out} is in use by another training run ({where}, started 2026-12-01T09:00:00Z)"
    if host == "another host":
        expected += f"; if that run is no longer running, delete {lock}"
    assert (code, err) == (2, expected + ".\n")
    assert seconds < 5 and os.listdir(out) == ["training.lock"] and lock.read_text() == before


def test_a_terminated_run_releases_its_lock(tiny_teacher_path, captions_file, tmp_path):
    """SIGTERM (a scheduler's preemption, forwarded by the launcher) releases the lock, so that a job requeued on
    another host, which cannot tell whether the holder is alive, is not refused."""
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_teacher_path), "--caption_file", str(captions_file)]
    argv += [
        "--output_dir",
        str(out),
        "--max_train_steps",
        "500",
        "--checkpointing_steps",
        "1000",
        "--report_to",
        "none",
    ]
    run = subprocess.Popen(
        [sys.executable, str(TRAINER_SCRIPT), *argv], env=conftest.TRAINER_ENV, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "training.lock").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not (out / "training.lock").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    from sim_diffusers.training.lock import OutputDirLock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for record in ({"pid": gone.pid}, {"pid": os.getpid(), "process_start": "1"}):  # dead; PID reused by another
        write_lock(tmp_path, **record)
        with OutputDirLock(tmp_path) as lock:
            assert lock.took_over["pid"] == record["pid"]
            assert json.loads((tmp_path / "training.lock").read_text())["token"] == lock.record["token"]
            with pytest.raises(Exception, match="is in use by another training run"):
                OutputDirLock(tmp_path).acquire()  # held by a live process (this one)
        assert not (tmp_path / "training.lock").exists()
    assert "Took over the stale lock" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# 11. What is uploaded (case 8): the pipeline, its model card and its validation grid; never caches, checkpoints,
# logs, training records or local paths


def test_the_upload_holds_the_pipeline_and_its_card_only(uninterrupted, tmp_path_factory, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    (out / "t5-cache").mkdir()  # an embedding cache inside output_dir: its index lists every caption
    (out / "t5-cache" / "index.json").write_text(json.dumps({"captions": CAPTIONS}))
    write_lock(out / "abandoned" / "20261201T000000Z-from-step-2" / "checkpoint-4")
    with (
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload,
    ):
        create_repo.return_value.repo_id = "me/sim-tiny"
        hub.push_output_dir(out, "me/sim-tiny", TOKEN)
    kwargs = upload.call_args.kwargs
    files = sorted(str(p.relative_to(out)) for p in all_files(out))
    uploaded = set(
        filter_repo_objects(
            files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns")
        )
    )
    code = {"pipeline_sim_one_step.py", "generator.py", "schedule.py", "teachers.py"}
    assert {"model_index.json", "README.md"} | code <= uploaded
    assert {name.split("/")[0] for name in uploaded} == {"model_index.json", "README.md"} | code | {
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }
    assert (
        uploaded
        == {f for f in files if f.split("/")[0] in {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}}
        | {"model_index.json", "README.md"}
        | code
    )
    local = str(tmp_path_factory.getbasetemp())  # every local path of these runs lies under it
    for name in uploaded:
        assert local.encode() not in (out / name).read_bytes(), f"{name} names a local path"
    assert "`output_dir` | `<local>/out`" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# 12. Captions decoded, counted and warned about (case 9)

UNICODE_CAPTIONS = ["a red cat", "une crème brûlée", "日本の猫"]


@pytest.mark.parametrize(
    "encoding, bom",
    [("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE)]
    + [("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)],
)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_caption_files_with_a_byte_order_mark_are_decoded(tmp_path, encoding, bom, suffix):
    from sim_diffusers.training.captions import read_caption_file

    lines = UNICODE_CAPTIONS if suffix == ".txt" else [json.dumps({"text": c}) for c in UNICODE_CAPTIONS]
    path = tmp_path / f"captions{suffix}"
    path.write_bytes(bom + "\r\n".join(lines).encode(encoding) + "\n".encode(encoding))
    captions = read_caption_file(path, "text" if suffix == ".jsonl" else None)
    assert captions.captions == UNICODE_CAPTIONS and captions.dropped == {}


def test_every_row_left_out_is_counted_by_kind(tmp_path, caplog):
    from sim_diffusers.training.captions import read_caption_file

    rows = [{"text": c} for c in CAPTIONS] + [{"text": 7}, {"text": None}, {"text": "  "}, {"text": "\u200b\u200d"}]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    captions = read_caption_file(path, "text")
    assert captions.captions == CAPTIONS
    assert captions.dropped == {"not text (int)": 1, "null": 1, "empty": 1, "invisible characters only": 1}
    assert "captions.jsonl (column 'text'): left out 4 of 9 entries (" in caplog.text
    assert "1 invisible characters only" in caplog.text and "training on 5." in caplog.text
    (tmp_path / "zero-width.txt").write_text("a red cat\n\u200b\n\ufeff\u2060\na blue dog\n")
    assert read_caption_file(tmp_path / "zero-width.txt").captions == ["a red cat", "a blue dog"]


def test_captions_longer_than_t5_keeps_are_reported(trainer, bad_inputs, tmp_path, capsys, caplog):
    long = " ".join(["a big red cat sitting on a small blue house"] * 12)  # about 120 words
    write_captions(tmp_path / "long.txt", CAPTIONS + [long])
    argv = trainer_argv(bad_inputs, {"--caption_file": str(tmp_path / "long.txt"), "--dry_run": None}, tmp_path / "o")
    code, _, err, _ = run_main(trainer, argv, capsys)
    assert code == 0, err
    assert (
        "1 of 6 captions are longer than --max_sequence_length 120 T5 tokens: T5 keeps their first 120." in caplog.text
    )


# ---------------------------------------------------------------------------------------------------------------------
# 13. examples/: one `error:` line and exit 2 for bad paths, before any model loads


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", conftest.REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_inputs(tmp_path_factory, tiny_teacher_path):
    root = tmp_path_factory.mktemp("examples")
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (root / "a-file").write_text("not a folder")
    (root / "no-pipeline").mkdir()
    return {"root": root, "teacher": tiny_teacher_path}


# (id, script, arguments, pattern of the error line). {root}, {teacher}: see example_inputs.
EXAMPLE_ROWS = [
    ("generate: model missing", "generate", ["--model", "{root}/gone/model", "a cat"], r"--model \S+ does not exist"),
    ("generate: not a pipeline", "generate", ["--model", "{root}/no-pipeline", "a cat"], r"is not a pipeline folder"),
    (
        "generate: Hub model unreachable",
        "generate",
        ["--model", "someone/no-such-model", "a cat", "--output_dir", "{root}/images"],
        r"--model someone/no-such-model cannot be loaded \(\w+",
    ),
    (
        "generate: prompt file not UTF-8",
        "generate",
        ["--model", "{teacher}", "--prompt_file", "{root}/latin1.txt"],
        r"--prompt_file \S+latin1\.txt is not UTF-8 text \(byte 3\); save it as UTF-8",
    ),
    (
        "generate: output is a file",
        "generate",
        ["--model", "{teacher}", "a cat", "--output_dir", "{root}/a-file"],
        r"--output_dir \S+a-file is a file",
    ),
    (
        "evaluate: model missing",
        "evaluate",
        ["--model", "SIM={root}/gone/model", "--dry_run"],
        r"--model SIM=\S+: \S+ does not exist",
    ),
    (
        "evaluate: Hub model unreachable",
        "evaluate",
        ["--model", "someone/no-such-model", "--dry_run"],
        r"--model someone/no-such-model: \w+",
    ),
    (
        "evaluate: captions not UTF-8",
        "evaluate",
        ["--model", "{teacher}", "--captions", "{root}/latin1.txt", "--dry_run"],
        r"--captions \S+latin1\.txt is not UTF-8 text",
    ),
    (
        "evaluate: output is a file",
        "evaluate",
        ["--model", "{teacher}", "--output_dir", "{root}/a-file", "--dry_run"],
        r"--output_dir \S+a-file is a file",
    ),
]


@pytest.mark.parametrize("script, argv, pattern", [r[1:] for r in EXAMPLE_ROWS], ids=[r[0] for r in EXAMPLE_ROWS])
def test_examples_give_one_error_line_for_bad_paths(example_inputs, script, argv, pattern, capsys):
    module = load_example(script)
    with pytest.raises(SystemExit) as exited:
        module.main(module.parse_args([a.format(**example_inputs) for a in argv]))
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (example_inputs["root"] / "images").exists()


def test_a_resume_applies_this_runs_optimisation_settings_over_the_checkpoints(tmp_path):
    """What load_state restores (base rates, the schedule's value, Adam's settings, the EMA decay) is replaced by this
    run's values: learning rates always, the others when --allow_changed_arguments accepted them."""
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sim_diffusers.training.run import apply_optimisation_settings

    def optimisation(lr, betas, eps, decay):
        net = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=decay)
        return net, opt, get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=10)

    old = [optimisation(5e-6, (0.0, 0.999), 1e-8, 0.0), optimisation(5e-5, (0.0, 0.999), 1e-8, 0.0)]
    for _, opt, schedule in old:
        for _ in range(4):
            opt.step()
            schedule.step()
    new = [optimisation(1e-5, (0.5, 0.99), 1e-6, 0.01), optimisation(1e-4, (0.5, 0.99), 1e-6, 0.01)]
    for (_, opt_old, sched_old), (_, opt_new, sched_new) in zip(old, new):  # what accelerator.load_state does
        opt_new.load_state_dict(opt_old.state_dict())
        sched_new.load_state_dict(sched_old.state_dict())
    ema = EMAModel(new[0][0].parameters(), decay=0.9)
    models = SimpleNamespace(
        generator_optimizer=new[0][1],
        generator_scheduler=new[0][2],
        fake_score_optimizer=new[1][1],
        fake_score_scheduler=new[1][2],
        ema=ema,
    )
    args = SimpleNamespace(
        learning_rate=1e-5,
        fake_score_learning_rate=1e-4,
        adam_beta1=0.5,
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        adam_weight_decay=0.01,
        ema_decay=0.99,
    )
    apply_optimisation_settings(models, args)
    for (_, opt, schedule), (_, _, reference), rate in zip(new, old, (1e-5, 1e-4)):
        factor = reference.get_last_lr()[0] / reference.base_lrs[0]  # the cosine schedule's value at step 4
        group = opt.param_groups[0]
        assert schedule.base_lrs == [rate] and group["initial_lr"] == rate
        assert group["lr"] == pytest.approx(rate * factor) and schedule.get_last_lr() == [group["lr"]]
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.5, 0.99), 1e-6, 0.01)
        schedule.step()  # and the schedule goes on from the new base rate
        assert group["lr"] == pytest.approx(rate * reference.lr_lambdas[0](5))
    assert ema.decay == 0.99


def test_a_fresh_run_over_an_earlier_run_sets_its_checkpoints_and_arguments_aside(branches, tmp_path):
    from types import SimpleNamespace

    from sim_diffusers.training import lineage
    from sim_diffusers.training.captions import CaptionSet

    out = tmp_path / "out"
    shutil.copytree(branches["first_checkpoints"], out)
    (out / "training_args.json").write_text('{"seed": 0}')
    args = SimpleNamespace(output_dir=str(out), train_batch_size=2, gradient_accumulation_steps=1, seed=1)
    with lineage.claim_output_dir(args, None, {"fingerprint": {"teacher": "sha256:x"}}, CaptionSet(CAPTIONS)):
        pass
    (folder,) = (out / "abandoned").iterdir()
    record = json.loads((folder / "abandoned.json").read_text())
    assert record["moved"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "training_args.json"]
    assert record["continued_from_step"] == 0 and "A fresh run" in record["reason"]
    assert (folder / "training_args.json").read_text() == '{"seed": 0}'
    assert json.loads((out / "training_args.json").read_text())["seed"] == 1  # this run starts the branch
    assert checkpointing.complete_checkpoints(out) == []


def test_evaluate_refuses_metric_weights_that_are_not_plain_tensors(tmp_path, capsys):
    evaluate = load_example("evaluate")
    head = tmp_path / "aesthetic-head.pth"
    torch.save(argparse.Namespace(payload="code"), head)
    args = argparse.Namespace(aesthetic_head=str(head), aesthetic_clip="unused", device="cpu", dtype="float32")
    with pytest.raises(SystemExit) as exited:
        evaluate.load_scorer("aesthetic", "aesthetic_head", {"clip_model": "unused"}, args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err == (
        f"error: --aesthetic_head {head} holds objects that are not plain tensors; refusing to unpickle it (it could "
        "run code). Use its .safetensors, or the file its authors publish.\n"
    )
