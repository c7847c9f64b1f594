"""What a run continues, and the record of every run in an output_dir.

A run starts at step 0 or at a checkpoint's step N, and continues the branch that leads there. Checkpoints beyond N
belong to a branch it abandons (a rollback to an earlier checkpoint, a fresh start over an earlier run, a newer
checkpoint that turned out unreadable): they are moved, never deleted, into `abandoned/<UTC time>-from-step-N/`
with `abandoned.json` (why, by which run) and a copy of `logs/steps.jsonl` as it was. So `latest` always means the
branch the user chose last, and pruning never meets the abandoned branch.

Each checkpoint records the run that wrote it (`run` in training_state.json: its arguments, the teacher's and the
captions' content fingerprints, the global batch). A resume compares them with its own: learning rates and how the
run is operated (steps, checkpoints, validation, logging, memory options) are applied as given and recorded; what
changes what is learned (seed, objective, optimiser settings, global batch, teacher or caption content) is refused
with the list of differences unless --allow_changed_arguments, and a few things never change (NEVER_ON_RESUME).

`training_args.json` holds the arguments of the run that started the current branch: a resume never rewrites it, a
fresh start moves the earlier one aside with that run's checkpoints. Every run appends one line to
`training_history.jsonl`: when, where, from which step, its arguments, what changed, what it set aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import fields
from pathlib import Path

from .captions import UserInputError
from .checkpointing import COMPLETE_MARKER, checkpoint_problem, checkpoint_step, complete_checkpoints
from .lock import OutputDirLock

logger = logging.getLogger(__name__)

ARGUMENTS_FILE = "training_args.json"
HISTORY_FILE = "training_history.jsonl"
ABANDONED_DIR = "abandoned"
STEP_LOG = Path("logs") / "steps.jsonl"

LEARNING_RATES = ("learning_rate", "fake_score_learning_rate", "regression_warmup_learning_rate")
# The model's definition (t*) or the checkpoint's structure depends on these: a resume cannot change them.
NEVER_ON_RESUME = (
    "conditioning_timestep",
    "num_generator_steps",
    "generator_timesteps",
    "fake_score_lora_rank",
    "use_ema",
    "use_8bit_adam",
)
TEACHER, CAPTIONS, GLOBAL_BATCH = "teacher content", "caption content", "global batch size"
# How a run was started, not what it trains: never a difference.
NOT_COMPARED = ("resume_from_checkpoint", "allow_changed_arguments", "dry_run")


def learning_settings() -> set[str]:
    """Arguments that change what is learned from a step on: every IterationConfig and OptimizerConfig field (so a
    new one is covered without a list to keep), the sample stream's and the text conditioning's, less the learning
    rates, which a resume applies."""
    from .iteration import IterationConfig
    from .run import OptimizerConfig

    names = {f.name for f in fields(IterationConfig)} | {f.name for f in fields(OptimizerConfig)}
    names |= {"seed", "max_sequence_length", "clean_caption", "min_timestep", "max_timestep"}
    names |= {"fake_score_lora_alpha", "ema_decay"}
    return names - set(LEARNING_RATES) - set(NEVER_ON_RESUME)


def is_global_rank_zero() -> bool:
    """The process that owns output_dir, known before any process group exists (launchers set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _json(value):
    return json.loads(json.dumps(value))


def run_record(args, teacher_facts: dict, caption_set, num_processes: int) -> dict:
    """What a checkpoint records of the run that wrote it."""
    from .hub import public_arguments

    return {
        "arguments": _json(public_arguments(vars(args))),
        "teacher": teacher_facts["fingerprint"]["teacher"],
        "captions": caption_set.fingerprint,
        "global_batch_size": args.train_batch_size * num_processes * args.gradient_accumulation_steps,
    }


def recorded_run(checkpoint: Path) -> dict | None:
    """The run record of a checkpoint (None for one written before runs were recorded)."""
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text()).get("run")


def _short(value):
    return value[:19] + "..." if isinstance(value, str) and value.startswith("sha256:") else value


def resume_differences(args, checkpoint: Path, teacher_facts: dict, caption_set) -> dict[str, dict]:
    """{"applied", "refused", "never"}: {setting: [checkpoint's value, this run's]} between the run that wrote
    `checkpoint` and this one; an empty dict for a checkpoint without a record."""
    recorded = recorded_run(checkpoint)
    if recorded is None:
        return {}
    now = run_record(args, teacher_facts, caption_set, world_size())
    before_args, now_args = recorded["arguments"], now["arguments"]
    learning = learning_settings()
    found = {"applied": {}, "refused": {}, "never": {}}
    for name in sorted(set(before_args) & set(now_args) - set(NOT_COMPARED)):
        if before_args[name] == now_args[name]:
            continue
        kind = "never" if name in NEVER_ON_RESUME else "refused" if name in learning else "applied"
        found[kind][name] = [before_args[name], now_args[name]]
    for name, key in ((TEACHER, "teacher"), (CAPTIONS, "captions"), (GLOBAL_BATCH, "global_batch_size")):
        if recorded.get(key) != now[key]:
            found["refused"][name] = [recorded.get(key), now[key]]
    return found


def _describe(changes: dict) -> str:
    parts = []
    for name, (before, now) in changes.items():
        label = name if " " in name else f"--{name}"
        parts.append(f"{label} {_short(before)} -> {_short(now)}")
    return ", ".join(parts)


def check_resume_arguments(args, checkpoint: Path, teacher_facts: dict, caption_set) -> dict[str, dict]:
    """Refuse a resume whose settings differ from the checkpoint's where that changes what is learned (unless
    --allow_changed_arguments), or where they can never differ; returns the differences."""
    found = resume_differences(args, checkpoint, teacher_facts, caption_set)
    if not found:
        logger.warning("%s records no arguments (written by an older version): they are not compared.", checkpoint)
        return found
    if found["never"]:
        raise UserInputError(
            f"--resume_from_checkpoint {checkpoint.name}: {_describe(found['never'])} cannot change on resume (the "
            "checkpoint's networks depend on it); train into a new --output_dir."
        )
    if found["refused"] and not args.allow_changed_arguments:
        raise UserInputError(
            f"--resume_from_checkpoint {checkpoint.name} was trained with other settings: "
            f"{_describe(found['refused'])}; resume with the same, or pass --allow_changed_arguments to apply these."
        )
    return found


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def set_aside_abandoned_branch(output_dir: Path, start_step: int, reason: str) -> Path | None:
    """Move what belongs to the branch a run starting at `start_step` abandons into abandoned/<time>-from-step-N/
    with a record: the checkpoints beyond that step, and for a fresh start (step 0) the earlier run's
    training_args.json too. Returns that folder (None when there was nothing to move)."""
    later = [path for path in complete_checkpoints(output_dir) if checkpoint_step(path) > start_step]
    if start_step == 0 and (output_dir / ARGUMENTS_FILE).is_file():
        later.append(output_dir / ARGUMENTS_FILE)
    if not later:
        return None
    folder = output_dir / ABANDONED_DIR / f"{_utc_stamp()}-from-step-{start_step}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = folder.with_name(f"{folder.name.split('~')[0]}~{suffix}")
    folder.mkdir(parents=True)
    if (output_dir / STEP_LOG).is_file():
        shutil.copy2(output_dir / STEP_LOG, folder / STEP_LOG.name)  # the resumed run drops its lines beyond N
    for path in later:
        os.replace(path, folder / path.name)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason,
        "continued_from_step": start_step,
        "moved": [path.name for path in later],
        "by": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    (folder / "abandoned.json").write_text(json.dumps(record, indent=2))
    logger.warning("%s; %s moved to %s (nothing deleted).", reason, ", ".join(path.name for path in later), folder)
    return folder


def _abandon_reason(output_dir: Path, resume_path: Path | None) -> str:
    if resume_path is None:
        return "A fresh run (no checkpoint to resume) starts over an earlier run"
    start = checkpoint_step(resume_path)
    unreadable = {
        path.name: why
        for path in complete_checkpoints(output_dir)
        if checkpoint_step(path) > start and (why := checkpoint_problem(path)) is not None
    }
    if unreadable:
        return f"Resuming from {resume_path.name}: the newer " + ", ".join(
            f"{name} cannot be read ({why})" for name, why in unreadable.items()
        )
    return f"Resuming from {resume_path.name}, earlier than the newest checkpoint: its later branch is abandoned"


@contextlib.contextmanager
def _released_on_sigterm():
    """SIGTERM (a scheduler's preemption or time limit, forwarded by the launcher) ends the run through Python's own
    exit, so the lock is released: a requeued job on another host would otherwise find it held. A checkpoint or save
    interrupted that way is a temporary folder, as after any crash."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = (
            signal.signal(signal.SIGTERM, terminate) if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else None
        )
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def claim_output_dir(args, resume_path: Path | None, teacher_facts: dict, caption_set):
    """For the run's lifetime, on the process that owns output_dir: hold its lock; set aside the branch this run
    abandons; record the run (training_history.jsonl, and training_args.json when it starts a branch)."""
    if not is_global_rank_zero():
        yield
        return
    output_dir = Path(args.output_dir)
    with _released_on_sigterm(), OutputDirLock(output_dir):  # the handler first: no moment holds the lock without it
        start = checkpoint_step(resume_path) if resume_path is not None else 0
        reason = _abandon_reason(output_dir, resume_path)
        abandoned = set_aside_abandoned_branch(output_dir, start, reason)
        changes = {}
        if resume_path is not None:
            changes = resume_differences(args, resume_path, teacher_facts, caption_set)
            for name, change in changes.get("applied", {}).items():
                if name in LEARNING_RATES or name == "max_train_steps":
                    logger.warning("Resuming with %s: applied from step %d on.", _describe({name: change}), start)
            for name, change in changes.get("refused", {}).items():
                logger.warning(
                    "Resuming with %s: accepted (--allow_changed_arguments), applied from step %d on.",
                    _describe({name: change}),
                    start,
                )
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "world_size": world_size(),
            "resumed_from": str(resume_path) if resume_path is not None else None,
            "start_step": start,
            "changed_on_resume": {
                "applied": changes.get("applied", {}),
                "accepted": changes.get("refused", {}),  # refused without --allow_changed_arguments
            },
            "abandoned": str(abandoned.relative_to(output_dir)) if abandoned else None,
            "teacher": teacher_facts["fingerprint"]["teacher"],
            "captions": caption_set.fingerprint,
            "arguments": run_record(args, teacher_facts, caption_set, world_size())["arguments"],
        }
        with open(output_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if not (output_dir / ARGUMENTS_FILE).exists():
            (output_dir / ARGUMENTS_FILE).write_text(json.dumps(record["arguments"], indent=2))
        yield
