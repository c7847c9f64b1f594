"""train_sim_pixart.py end to end on the tiny fixture: Accelerate 1 and 2 processes, gradient sync, checkpoints and
resume, the embedding cache, LoRA fake score, EMA, bf16, model card, Hub upload, and what gets written."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import conftest
import pytest
import torch
from conftest import (
    TRAINER_ENV,
    TRAINER_SCRIPT,
    component_weights,
    load_trainer_module,
    max_difference,
    write_captions,
)
from safetensors.torch import load_file

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.pipeline_sim_one_step import pipeline_code_files

CAPTIONS = [
    "a red cat",
    "a blue dog",
    "a green bird",
    "a house by the lake",
    "a small boat on the river",
    "a bright sun",
]
# Adam with a large epsilon is close to SGD: float noise in tiny gradients is not blown up to +-lr by the
# normalisation, so runs that should agree agree to float precision, and runs that should not differ clearly.
# --regression_warmup_steps 0: these short runs test the SIM iteration itself (the warm-up has its own test).
COMMON = [
    "--max_train_steps",
    "3",
    "--report_to",
    "none",
    "--regression_warmup_steps",
    "0",
    "--learning_rate",
    "1e-2",
    "--fake_score_learning_rate",
    "1e-2",
    "--adam_epsilon",
    "1.0",
    "--seed",
    "3",
]


def run_trainer(teacher, captions, output_dir, *extra, processes=None):
    return conftest.run_trainer(teacher, captions, output_dir, *COMMON, *extra, processes=processes)


def transformer_weights(folder):
    return component_weights(folder)


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.txt", CAPTIONS)


@pytest.fixture(scope="module")
def one_process_run(tiny_teacher_path, captions_file, tmp_path_factory):
    """accelerate launch, 1 process, per-device batch 4; checkpoints every step, at most 2 kept, validation."""
    out = tmp_path_factory.mktemp("run") / "one_process"
    run_trainer(
        tiny_teacher_path,
        captions_file,
        out,
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
        "--validation_prompts",
        "a red cat",
        "a blue dog",
        "--num_validation_images",
        "2",
        "--validation_steps",
        "3",
        processes=1,
    )
    return out


@pytest.fixture(scope="module")
def two_process_run(tiny_teacher_path, captions_file, tmp_path_factory):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU), per-device batch 2: the same global batch."""
    out = tmp_path_factory.mktemp("run") / "two_processes"
    run_trainer(
        tiny_teacher_path, captions_file, out, "--train_batch_size", "2", "--checkpointing_steps", "3", processes=2
    )
    return out


def test_one_process_run_gives_a_loadable_pipeline_that_learned(one_process_run, tiny_teacher_path):
    trained = SIMOneStepPipeline.from_pretrained(one_process_run)
    untrained = SIMOneStepPipeline.from_teacher(tiny_teacher_path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = trained(["a red cat", "a blue dog"], latents=z, output_type="np").images
    b = untrained(["a red cat", "a blue dog"], latents=z, output_type="np").images
    assert abs(a - b).max() > 1e-3
    assert type(trained.text_encoder).__name__ == "T5EncoderModel"


def test_two_processes_train_like_one_with_the_same_global_batch(one_process_run, two_process_run, tiny_teacher_path):
    one, two = transformer_weights(one_process_run), transformer_weights(two_process_run)
    untrained = transformer_weights(tiny_teacher_path)
    change = max_difference(one, untrained)
    assert change > 1e-3
    assert max_difference(one, two) < 1e-6 * max(1.0, change * 1e3)  # synchronised gradients, same data and noise
    fake_one = load_file(str(one_process_run / "checkpoint-3" / "fake_score" / "diffusion_pytorch_model.safetensors"))
    fake_two = load_file(str(two_process_run / "checkpoint-3" / "fake_score" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(fake_one, fake_two) < 1e-5
    assert sorted(p.name for p in (two_process_run / "checkpoint-3").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    SIMOneStepPipeline.from_pretrained(two_process_run)


def test_a_different_batch_split_is_not_the_same_run(one_process_run, tiny_teacher_path, captions_file, tmp_path):
    """Guards the test above: one process with batch 2 sees other samples and must end elsewhere."""
    run_trainer(
        tiny_teacher_path, captions_file, tmp_path / "b2", "--train_batch_size", "2", "--checkpointing_steps", "100"
    )
    assert max_difference(transformer_weights(one_process_run), transformer_weights(tmp_path / "b2")) > 1e-5


def test_checkpoints_pruning_validation_and_only_safe_files(one_process_run):
    assert sorted(p.name for p in one_process_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((one_process_run / "checkpoint-3" / "training_state.json").read_text())
    assert state["step"] == 3 and state["skipped"] == {"generator": 0, "fake_score": 0}
    assert (one_process_run / "validation" / "step-0000003.png").is_file()
    accelerate_state = {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"}
    for path in one_process_run.rglob("*"):
        if path.is_file():
            allowed = path.suffix in {".safetensors", ".json", ".jsonl", ".png", ".md", ".txt", ".model"}
            allowed |= "checkpoint-" in str(path.parent) and (
                path.name in accelerate_state or path.name.startswith("random_states_")
            )
            allowed |= path.parent == one_process_run and path.name in {
                p.name for p in pipeline_code_files()
            }  # for stock diffusers
            assert allowed, path
    assert not list(one_process_run.glob(".tmp-*"))
    steps = [json.loads(line) for line in (one_process_run / "logs" / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all({"loss/generator", "loss/fake_score", "loss/regression", "lr/generator"} <= row.keys() for row in steps)


def test_model_card_metadata_and_loading_code(one_process_run):
    card = (one_process_run / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: diffusers" in header and "pipeline_tag: text-to-image" in header
    assert "score-implicit-matching" in header and "license:" in header
    assert "SIMOneStepPipeline.from_pretrained" in card and "validation/latest.png" in card
    assert "`max_train_steps` | `3`" in card


def test_resume_latest_with_more_steps_ends_where_an_uninterrupted_run_ends(
    one_process_run, tiny_teacher_path, captions_file, tmp_path
):
    out = tmp_path / "resumed"
    first = list(COMMON)
    first[first.index("--max_train_steps") + 1] = "2"  # the same run, stopped after 2 steps
    args = [
        "--pretrained_model_name_or_path",
        str(tiny_teacher_path),
        "--caption_file",
        str(captions_file),
        "--output_dir",
        str(out),
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "1",
    ]
    subprocess.run(
        [sys.executable, str(TRAINER_SCRIPT), *args, *first],
        check=True,
        capture_output=True,
        env=TRAINER_ENV,
        timeout=600,
    )
    resumed = run_trainer(
        tiny_teacher_path,
        captions_file,
        out,
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "1",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert max_difference(transformer_weights(out), transformer_weights(one_process_run)) < 1e-6


def test_text_embedding_cache_trains_like_online_encoding(one_process_run, tiny_teacher_path, captions_file, tmp_path):
    cache = tmp_path / "t5_cache"
    run_trainer(
        tiny_teacher_path,
        captions_file,
        tmp_path / "cached",
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "100",
        "--text_embedding_cache",
        str(cache),
    )
    index = json.loads((cache / "index.json").read_text())
    assert sorted(index["captions"]) == sorted(CAPTIONS)
    assert max_difference(transformer_weights(tmp_path / "cached"), transformer_weights(one_process_run)) < 1e-6
    assert SIMOneStepPipeline.from_pretrained(tmp_path / "cached").text_encoder is not None


def test_bf16_lora_fake_score_ema_and_push_to_hub(tiny_teacher_path, captions_file, tmp_path, monkeypatch):
    """In process (mocks reach the Hub boundary): bf16 on CPU with gradient checkpointing, a LoRA fake score that
    trains, EMA weights saved, and --push_to_hub uploading exactly output_dir without checkpoints."""
    from accelerate.state import AcceleratorState

    script = load_trainer_module()
    out = tmp_path / "lora"
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    args = script.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_teacher_path),
            "--caption_file",
            str(captions_file),
            "--output_dir",
            str(out),
            *COMMON,
            "--train_batch_size",
            "2",
            "--checkpointing_steps",
            "3",
            "--mixed_precision",
            "bf16",
            "--fake_score_lora_rank",
            "4",
            "--use_ema",
            "--ema_decay",
            "0.5",
            "--gradient_checkpointing",
            "--push_to_hub",
            "--hub_model_id",
            "someone/sim-tiny",
        ]
    )
    repo = mock.Mock(repo_id="someone/sim-tiny")
    with (
        mock.patch("huggingface_hub.create_repo", return_value=repo) as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload_folder,
    ):
        try:
            assert script.main(args) == 0
        finally:
            AcceleratorState._reset_state(True)
    create_repo.assert_called_once()
    assert create_repo.call_args.kwargs["token"] == "hf_fake_token_for_tests"
    upload = upload_folder.call_args.kwargs
    assert upload["repo_id"] == "someone/sim-tiny" and Path(upload["folder_path"]) == out
    assert "checkpoint-*" in upload["ignore_patterns"]

    checkpoint = out / "checkpoint-3"
    lora = load_file(str(checkpoint / "fake_score_lora" / "adapter_model.safetensors"))
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0  # B starts at zero: the LoRA trained
    assert not (checkpoint / "fake_score").exists()  # no full copy of the teacher

    ema = load_file(str(checkpoint / "generator_ema" / "diffusion_pytorch_model.safetensors"))
    live = load_file(str(checkpoint / "generator" / "diffusion_pytorch_model.safetensors"))
    saved = transformer_weights(out)
    assert max_difference(saved, ema) < 1e-7
    assert max_difference(saved, live) > 1e-6
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]  # a local teacher has no Hub id


def test_regression_warmup_trains_on_the_regression_term_alone(tiny_teacher_path, captions_file, tmp_path):
    """During --regression_warmup_steps the divergence takes no part: runs that differ only in it end equal. The
    warm-up
    regresses with --regression_warmup_distance, the steps after it with --regression_distance."""
    warm = [
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "1",
        "--regression_warmup_steps",
        "1",
        "--checkpointing_steps",
        "10",
    ]
    run_trainer(tiny_teacher_path, captions_file, tmp_path / "sim", *warm, "--divergence", "sim")
    run_trainer(tiny_teacher_path, captions_file, tmp_path / "sid", *warm, "--divergence", "sid")
    run_trainer(
        tiny_teacher_path,
        captions_file,
        tmp_path / "sid_no_warmup",
        *warm[:-4],
        "--checkpointing_steps",
        "10",
        "--divergence",
        "sid",
    )
    teacher = load_file(str(Path(tiny_teacher_path) / "transformer" / "diffusion_pytorch_model.safetensors"))
    sim, sid = transformer_weights(tmp_path / "sim"), transformer_weights(tmp_path / "sid")
    assert max_difference(sim, sid) < 1e-7
    assert max_difference(sim, teacher) > 1e-4  # the regression term did train the generator
    assert max_difference(transformer_weights(tmp_path / "sid_no_warmup"), sid) > 1e-4
    run_trainer(
        tiny_teacher_path, captions_file, tmp_path / "slow", *warm, "--regression_warmup_learning_rate", "1e-3"
    )
    slow = transformer_weights(tmp_path / "slow")  # default 10 x 1e-2: the warm-up learning rate is the one used
    assert 0 < max_difference(slow, teacher) < 0.1 * max_difference(sim, teacher)
    # Each phase uses its own regression distance (warm-up: pseudo-Huber, then l2, by default)
    run_trainer(tiny_teacher_path, captions_file, tmp_path / "l2_warmup", *warm, "--regression_warmup_distance", "l2")
    assert max_difference(transformer_weights(tmp_path / "l2_warmup"), sim) > 1e-4
    run_trainer(
        tiny_teacher_path,
        captions_file,
        tmp_path / "l2_warmup_sim_phase",
        *warm,
        "--regression_warmup_distance",
        "l2",
        "--regression_distance",
        "pseudo_huber",
    )
    assert (
        max_difference(
            transformer_weights(tmp_path / "l2_warmup_sim_phase"), transformer_weights(tmp_path / "l2_warmup")
        )
        < 1e-7
    )
    run_trainer(
        tiny_teacher_path,
        captions_file,
        tmp_path / "sid_no_warmup_huber",
        *warm[:-4],
        "--checkpointing_steps",
        "10",
        "--divergence",
        "sid",
        "--regression_distance",
        "pseudo_huber",
    )
    assert (
        max_difference(
            transformer_weights(tmp_path / "sid_no_warmup_huber"), transformer_weights(tmp_path / "sid_no_warmup")
        )
        > 1e-6
    )


def test_regression_warmup_adam_beta1_applies_to_the_warmup_only(tiny_teacher_path, captions_file, tmp_path):
    """--regression_warmup_adam_beta1 (default 0.9) is the generator's Adam beta1 during the warm-up; after it,
    --adam_beta1 (default 0) again."""
    steps = [
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "3",
        "--regression_warmup_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--adam_epsilon",
        "1e-8",
    ]
    run_trainer(tiny_teacher_path, captions_file, tmp_path / "momentum", *steps)  # default 0.9
    run_trainer(tiny_teacher_path, captions_file, tmp_path / "plain", *steps, "--regression_warmup_adam_beta1", "0")

    def generator_betas(
        run, step
    ):  # optimizer.bin is the generator's (prepared first), optimizer_1.bin the fake score's
        state = torch.load(tmp_path / run / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)
        return [tuple(group["betas"]) for group in state["param_groups"]]

    assert set(generator_betas("momentum", 2)) == {(0.9, 0.999)}
    assert set(generator_betas("momentum", 3)) == {(0.0, 0.999)}
    assert set(generator_betas("plain", 2)) == {(0.0, 0.999)}

    def generator_at(run, step):
        return load_file(
            str(tmp_path / run / f"checkpoint-{step}" / "generator" / "diffusion_pytorch_model.safetensors")
        )

    # The first step is the same either way (Adam's bias-corrected first moment is the gradient); the second is not.
    assert max_difference(generator_at("momentum", 1), generator_at("plain", 1)) < 1e-6
    assert max_difference(generator_at("momentum", 2), generator_at("plain", 2)) > 1e-4
