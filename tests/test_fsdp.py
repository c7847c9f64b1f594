"""FSDP2 (--sharding) and multi-node training on CPU: 2 processes, gloo, the tiny fixture, every launch through an
`examples/accelerate_configs/` file adapted to CPU (mixed_precision no, 2 processes, localhost).

Each run is a module-scoped fixture whose output several tests read (a launch costs ~15 s, mostly imports):
  reference       1_gpu.yaml, 1 process, batch 4
  ddp             8_gpus.yaml, 2 processes x batch 2
  fsdp            8_gpus.yaml + --sharding fsdp, 2 x 2, validation images at steps 2 and 4
  fsdp_killed     the fsdp run, SIGKILLed inside step 3, then resumed from checkpoint-2
  fsdp_lora       --sharding fsdp, LoRA fake score (its module is the teacher: sharded too), against lora_reference
  fsdp_accumulate --sharding fsdp_teacher, 2 x batch 1 x 2 micro-batches, --gradient_checkpointing
  two_machines    2_nodes_16_gpus.yaml as 2 machines x 1 process on 127.0.0.1, --sharding fsdp
All train 4 steps with EMA and a checkpoint every 2. Runs that should agree use the same global batch of 4: per-sample
randomness comes from the sample's global index, so they see the same samples and noise, and differ only in the order
of float32 reductions (all-reduce, reduce-scatter per block, sums over a local batch of 4, 2 or 1).

Tolerance: Adam with epsilon 1 (as tests/test_trainer.py) is close to SGD, so those rounding differences are not
blown up to +-lr by the normalisation; measured, they stay near 1.5e-8 in weights that moved by about 3e-3 (5e-6
relative). The tests allow 1e-4 of the largest weight change: 20x the measured noise, while a real difference (a
frozen parameter that should have trained, another batch split, a lost optimiser state) moves weights by a sizeable
fraction of the change (tests/test_trainer.py: a different batch split differs by more than 1e-5 absolute).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    TRAINER_ENV,
    TRAINER_SCRIPT,
    component_weights,
    describe,
    free_port,
    load_trainer_module,
    max_difference,
    run_process_group,
    run_process_groups,
    write_captions,
)
from safetensors.torch import load_file

from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.training.checkpointing import COMPLETE_MARKER

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs"
CAPTIONS = ["a red cat", "a blue dog", "a green bird", "a house by the lake", "a small boat on the river"]
COMMON = [
    "--max_train_steps",
    "4",
    "--checkpointing_steps",
    "2",
    "--report_to",
    "none",
    "--use_ema",
    "--regression_warmup_steps",
    "1",
    "--learning_rate",
    "1e-2",
    "--fake_score_learning_rate",
    "1e-2",
    "--adam_epsilon",
    "1.0",
    "--seed",
    "3",
]
FSDP = ["--sharding", "fsdp", "--validation_prompts", "a red cat", "--num_validation_images", "1"]
FSDP += ["--validation_steps", "2"]
RELATIVE_TOLERANCE = 1e-4
EXERCISED = set()  # the config files the fixtures launched with


def adapted_config(name: str, folder: Path, **overrides) -> Path:
    """An examples/accelerate_configs file for this machine: no mixed precision (float comparisons), fewer
    processes, localhost."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    config.update({"mixed_precision": "no", "main_process_port": free_port(), **overrides})
    path = folder / f"{Path(name).stem}-{'-'.join(f'{k}{v}' for k, v in overrides.items())}.yaml"
    path.write_text(yaml.safe_dump(config))
    EXERCISED.add(name)
    return path


def trainer_command(config: Path, teacher, captions, output_dir, args) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(teacher), "--caption_file", str(captions)]
    argv += ["--output_dir", str(output_dir), *COMMON, *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(TRAINER_SCRIPT),
        *argv,
    ]


def launch(name, teacher, captions, output_dir, *args, processes=2, faults="", check=True):
    """accelerate launch --config_file <adapted name> train_sim_pixart.py ... on one machine."""
    overrides = {"num_processes": processes} if processes > 1 else {}
    config = adapted_config(name, output_dir.parent, **overrides)
    env = {**TRAINER_ENV, "SIM_DIFFUSERS_TEST_FAULTS": faults}
    cmd = trainer_command(config, teacher, captions, output_dir, args)
    result = run_process_group(cmd, env)
    if check:
        assert result.returncode == 0, describe(result)
    return result


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.txt", CAPTIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp_runs")


@pytest.fixture(scope="module")
def reference(tiny_teacher_path, captions_file, runs):
    launch("1_gpu.yaml", tiny_teacher_path, captions_file, runs / "reference", "--train_batch_size", "4", processes=1)
    return runs / "reference"


@pytest.fixture(scope="module")
def ddp(tiny_teacher_path, captions_file, runs):
    launch("8_gpus.yaml", tiny_teacher_path, captions_file, runs / "ddp", "--train_batch_size", "2")
    return runs / "ddp"


@pytest.fixture(scope="module")
def fsdp(tiny_teacher_path, captions_file, runs):
    launch("8_gpus.yaml", tiny_teacher_path, captions_file, runs / "fsdp", "--train_batch_size", "2", *FSDP)
    return runs / "fsdp"


@pytest.fixture(scope="module")
def fsdp_killed(tiny_teacher_path, captions_file, runs):
    """The fsdp run, SIGKILLed inside step 3 (0-based; after checkpoint-2), then resumed with `latest`."""
    out, args = runs / "fsdp_killed", ["--train_batch_size", "2", *FSDP, "--resume_from_checkpoint", "latest"]
    killed = launch("8_gpus.yaml", tiny_teacher_path, captions_file, out, *args, faults="kill:step@3", check=False)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, describe(killed)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = launch("8_gpus.yaml", tiny_teacher_path, captions_file, out, *args)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    return out


@pytest.fixture(scope="module")
def lora_reference(tiny_teacher_path, captions_file, runs):
    args = ["--train_batch_size", "4", "--fake_score_lora_rank", "4"]
    launch("1_gpu.yaml", tiny_teacher_path, captions_file, runs / "lora_reference", *args, processes=1)
    return runs / "lora_reference"


@pytest.fixture(scope="module")
def fsdp_lora(tiny_teacher_path, captions_file, runs):
    # Batch 2 per process: only rank 0 holds a regression sample (one in 4 by global index), so rank 1 must still
    # take part in the sharded teacher's all-gathers for the regression targets.
    args = ["--train_batch_size", "2", "--sharding", "fsdp", "--fake_score_lora_rank", "4"]
    launch("8_gpus.yaml", tiny_teacher_path, captions_file, runs / "fsdp_lora", *args)
    return runs / "fsdp_lora"


@pytest.fixture(scope="module")
def fsdp_accumulate(tiny_teacher_path, captions_file, runs):
    args = ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--sharding", "fsdp_teacher"]
    args += FSDP[2:]  # the fsdp run's validation, here with the teacher sharded too
    launch(
        "8_gpus.yaml", tiny_teacher_path, captions_file, runs / "fsdp_accumulate", *args, "--gradient_checkpointing"
    )
    return runs / "fsdp_accumulate"


@pytest.fixture(scope="module")
def two_machines(tiny_teacher_path, captions_file, runs):
    """2_nodes_16_gpus.yaml as 2 machines x 1 process: two launchers on this host, machine ranks 0 and 1."""
    out, port = runs / "two_machines", free_port()
    cmds = []
    for rank in (0, 1):
        config = adapted_config(
            "2_nodes_16_gpus.yaml",
            runs,
            num_processes=2,
            machine_rank=rank,
            main_process_ip="127.0.0.1",
            main_process_port=port,
        )
        cmds.append(trainer_command(config, tiny_teacher_path, captions_file, out, ["--train_batch_size", "2", *FSDP]))
    for result in run_process_groups(cmds, TRAINER_ENV):
        assert result.returncode == 0, describe(result)
    return out


def weights(run: Path) -> dict:
    """Every saved network of a run: the final pipeline's (EMA) transformer and the last checkpoint's networks."""
    found = {"transformer": component_weights(run)}
    last = run / "checkpoint-4"
    for name in ("generator", "fake_score", "generator_ema"):
        if (last / name).is_dir():
            found[name] = component_weights(last, name)
    if (last / "fake_score_lora").is_dir():
        found["fake_score_lora"] = load_file(str(last / "fake_score_lora" / "adapter_model.safetensors"))
    return found


def assert_same_training(a: Path, b: Path, teacher: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    change = max_difference(component_weights(a, "checkpoint-4/generator"), component_weights(teacher))
    assert change > 1e-3  # the runs trained
    for name in wa:
        assert max_difference(wa[name], wb[name]) <= RELATIVE_TOLERANCE * change, name


def logged(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "logs" / "steps.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------


def test_fsdp_gives_the_weights_of_ddp_and_of_one_process(reference, ddp, fsdp, tiny_teacher_path):
    assert_same_training(ddp, reference, tiny_teacher_path)
    assert_same_training(fsdp, reference, tiny_teacher_path)
    assert_same_training(fsdp, ddp, tiny_teacher_path)
    # The global gradient norm over the shards is the norm of the whole gradient (clipping and the NaN guard use it).
    for key in ("grad_norm/generator", "grad_norm/fake_score"):
        assert logged(fsdp, key) == pytest.approx(logged(reference, key), rel=1e-5)


def test_fsdp_checkpoints_are_gathered_safetensors_and_the_pipeline_is_a_diffusers_folder(fsdp, tiny_teacher_path):
    last = fsdp / "checkpoint-4"
    assert sorted(p.name for p in last.iterdir()) == [
        "fake_score",
        "generator",
        "generator_ema",
        "optimizers",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "training_state.json",
    ]
    assert sorted(p.name for p in (last / "optimizers").iterdir()) == [
        "fake_score.safetensors",
        "generator.safetensors",
        "state.json",
    ]
    assert json.loads((last / "optimizers" / "state.json").read_text())["world_size"] == 2
    # Full (gathered) tensors, not one process's shard: the same shapes as the teacher's.
    generator = component_weights(last, "generator")
    teacher = component_weights(tiny_teacher_path)
    assert {k: v.shape for k, v in generator.items()} == {k: v.shape for k, v in teacher.items()}
    exp_avg = load_file(str(last / "optimizers" / "generator.safetensors"))
    assert {k.rpartition("/")[0] for k in exp_avg} == set(generator)
    assert all(exp_avg[f"{k}/exp_avg"].shape == v.shape for k, v in generator.items())
    config = json.loads((last / "generator" / "config.json").read_text())
    assert config["_class_name"] == "PixArtTransformer2DModel"  # not FSDP's subclass
    assert (fsdp / "validation" / "step-0000002.png").is_file() and (
        fsdp / "validation" / "step-0000004.png"
    ).is_file()
    pipe = SIMOneStepPipeline.from_pretrained(fsdp)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"


def test_fsdp_resume_after_sigkill_equals_the_uninterrupted_run(fsdp, fsdp_killed):
    # Gathered checkpoints restore weights, EMA, optimiser states and schedules exactly: bit for bit.
    for name, tensors in weights(fsdp).items():
        assert max_difference(tensors, weights(fsdp_killed)[name]) == 0.0, name
    for optimizer in ("generator", "fake_score"):
        a = load_file(str(fsdp / "checkpoint-4" / "optimizers" / f"{optimizer}.safetensors"))
        b = load_file(str(fsdp_killed / "checkpoint-4" / "optimizers" / f"{optimizer}.safetensors"))
        assert max_difference(a, b) == 0.0, optimizer
    assert logged(fsdp_killed, "loss/generator") == logged(fsdp, "loss/generator")


def test_fsdp_lora_fake_score_matches_one_process(lora_reference, fsdp_lora, tiny_teacher_path):
    assert (fsdp_lora / "checkpoint-4" / "fake_score_lora").is_dir() and not (
        fsdp_lora / "checkpoint-4" / "fake_score"
    ).exists()
    assert_same_training(fsdp_lora, lora_reference, tiny_teacher_path)


def test_fsdp_gradient_accumulation_with_checkpointing_and_a_sharded_teacher_matches_one_process(
    reference, fsdp_accumulate, tiny_teacher_path
):
    assert_same_training(fsdp_accumulate, reference, tiny_teacher_path)


def test_fsdp_validation_with_a_sharded_teacher_equals_the_one_with_a_whole_teacher(fsdp, fsdp_accumulate):
    """The validation runs the sharded networks on every process; its values do not depend on what is sharded (the
    two runs train the same weights, asserted above)."""
    from sim_diffusers.training.validation import read_validation_log

    whole, sharded = read_validation_log(fsdp), read_validation_log(fsdp_accumulate)
    assert [v["step"] for v in sharded] == [v["step"] for v in whole] == [0, 2, 4]
    for a, b in zip(whole, sharded):
        for prompt, values in a["prompts"].items():
            for name in ("diversity_ratio", "teacher_agreement", "teacher_spread"):
                assert b["prompts"][prompt][name] == pytest.approx(values[name], rel=1e-3), (a["step"], name)


def test_two_machines_with_one_process_each_train_like_one_machine_with_two(fsdp, two_machines, tiny_teacher_path):
    assert_same_training(two_machines, fsdp, tiny_teacher_path)


def test_every_accelerate_config_is_launched_by_a_test(reference, ddp, fsdp, two_machines):
    assert EXERCISED == {p.name for p in CONFIGS.glob("*.yaml")}
    for path in CONFIGS.glob("*.yaml"):
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any("accelerate launch --config_file" in line for line in header), path.name
        assert any("Verified (tests/test_fsdp.py" in line for line in header), path.name


# ---------------------------------------------------------------------------------------------------------------------
# Bad combinations: one line, exit 2, before any model loads (in-process, no launch)

BAD_COMBINATIONS = [
    (
        "unknown sharding",
        {},
        ["--sharding", "zero3"],
        r"Unknown --sharding 'zero3'; choose one of none, fsdp, fsdp_teacher\.",
    ),
    (
        "fsdp in one process",
        {},
        ["--sharding", "fsdp"],
        r"--sharding fsdp splits the networks over processes, but this run has 1;",
    ),
    ("gpu memory zero", {}, ["--gpu_memory_gb", "0"], r"--gpu_memory_gb must be > 0, got 0\.0\."),
    ("gpu memory negative", {}, ["--gpu_memory_gb", "-80"], r"--gpu_memory_gb must be > 0, got -80\.0\."),
    ("accelerate's fsdp plugin", {"ACCELERATE_USE_FSDP": "true"}, [], r"Accelerate's FSDP plugin .* --sharding fsdp"),
    ("fsdp with fp16", {"WORLD_SIZE": "2"}, ["--sharding", "fsdp", "--mixed_precision", "fp16"], r"not fp16"),
    (
        "fsdp without clipping",
        {"WORLD_SIZE": "2"},
        ["--sharding", "fsdp", "--max_grad_norm", "0"],
        r"needs --max_grad_norm > 0",
    ),
    (
        "a ddp checkpoint resumed with fsdp",
        {"WORLD_SIZE": "2"},
        ["--sharding", "fsdp", "--resume_from_checkpoint", "latest"],
        r"checkpoint-2 was written with --sharding none; resume it with the same kind of --sharding",
    ),
    (
        "an fsdp checkpoint resumed without",
        {},
        ["--resume_from_checkpoint", "latest", "sharded"],
        r"checkpoint-2 was written with FSDP2 \(--sharding fsdp or fsdp_teacher\)",
    ),
]


@pytest.mark.parametrize(
    "env, extra, pattern", [r[1:] for r in BAD_COMBINATIONS], ids=[r[0] for r in BAD_COMBINATIONS]
)
def test_fsdp_bad_combinations_fail_before_any_model_loads(
    env, extra, pattern, tiny_teacher_path, tmp_path, capsys, monkeypatch
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out, resuming = tmp_path / "out", "--resume_from_checkpoint" in extra
    if resuming:  # a complete, readable checkpoint of the other kind
        from safetensors.torch import save_file

        checkpoint = out / "checkpoint-2"
        (checkpoint / "generator").mkdir(parents=True)
        save_file({"weight": torch.zeros(1)}, str(checkpoint / "generator" / "diffusion_pytorch_model.safetensors"))
        if "sharded" in extra:
            (checkpoint / "optimizers").mkdir()
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 2}))
        extra = [e for e in extra if e != "sharded"]
    captions = write_captions(tmp_path / "captions.txt", CAPTIONS)
    trainer = load_trainer_module("train_sim_pixart_fsdp_checks")
    argv = ["--pretrained_model_name_or_path", str(tiny_teacher_path), "--caption_file", str(captions)]
    argv += ["--output_dir", str(out), "--report_to", "none", *extra]
    tic = time.perf_counter()
    code = trainer.main(trainer.parse_args(argv))
    seconds = time.perf_counter() - tic
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(pattern, captured.err), captured.err
    assert seconds < 5, f"validation took {seconds:.1f} s"
    # Nothing written before the inputs are known to be good (the resume cases' checkpoint was there before).
    assert (sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]) if resuming else not out.exists()
