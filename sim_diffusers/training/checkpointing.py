"""Crash-safe checkpoint directories and pipeline saves.

A checkpoint is written into `.tmp-checkpoint-{step}` and renamed to `checkpoint-{step}` only when complete (the
rename is atomic on POSIX file systems), so a job killed at any moment leaves either a whole checkpoint or a
temporary directory that `latest` resolution ignores and the next save clears. A checkpoint damaged afterwards (a
disk error, a partial copy) is caught by `checkpoint_problem`, which reads every file's header without loading the
weights, so that `latest` falls back to the newest readable one. The final pipeline is saved the same
way: components are written into a temporary directory (their configs cleared of the local paths diffusers records
in `_name_or_path`), moved into `output_dir`, and `model_index.json`, which `from_pretrained` reads first, is moved
last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "training_state.json"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it can: its state file, every safetensors
    file (header and size), and Accelerate's optimiser, scheduler and RNG files (unpickled with weights_only=True and
    memory-mapped, so no tensor data is read and no code can run)."""
    import pickle

    from .fingerprints import UnreadableFile, safetensors_header

    path = Path(path)
    try:
        state = json.loads((path / COMPLETE_MARKER).read_text())
        if state["step"] != checkpoint_step(path):
            return f"its {COMPLETE_MARKER} says step {state['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} is unreadable"
    weights = sorted(path.rglob("*.safetensors"))
    if not any(p.parent.name == "generator" for p in weights):
        return "it holds no generator weights"
    for file in weights:
        try:
            safetensors_header(file)
        except (OSError, UnreadableFile) as err:
            folder = file.relative_to(path).parent
            return f"{'' if folder == Path('.') else f'{folder}/'}{err}"
    for file in sorted(path.glob("*.bin")) + sorted(path.glob("*.pkl")):
        from accelerate.utils import load

        try:
            load(file, map_location="cpu", mmap=True)
        except pickle.UnpicklingError:
            # torch's own message would advise weights_only=False: never pass that on for a file of unknown origin.
            return f"{file.name} holds objects that are not plain tensors, refused unread (it could run code)"
        except Exception as err:  # noqa: BLE001 - truncated zip, bad magic...: unreadable either way
            return f"{file.name} is unreadable ({type(err).__name__})"
    return None


def latest_good_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, dict[Path, str]]:
    """(the newest complete checkpoint that `checkpoint_problem` passes, {newer ones passed over: why})."""
    skipped = {}
    for path in reversed(complete_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped[path] = problem
    return None, skipped


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> directory.")
    return int(match.group(1))


def temporary_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}checkpoint-{step}"


def clear_temporary(output_dir: str | os.PathLike) -> None:
    """Remove leftovers of saves interrupted by a crash."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def commit_checkpoint(tmp_dir: Path, step: int) -> Path:
    """Atomically publish a fully written temporary checkpoint as `checkpoint-{step}`."""
    if not (tmp_dir / COMPLETE_MARKER).is_file():
        raise RuntimeError(f"{tmp_dir} has no {COMPLETE_MARKER}: refusing to publish an incomplete checkpoint.")
    final = tmp_dir.parent / f"checkpoint-{step}"
    if final.exists():  # a re-run of the same step after a resume: the new one replaces it
        stale = tmp_dir.parent / f"{TMP_PREFIX}stale-checkpoint-{step}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    return final


def prune_checkpoints(
    output_dir: str | os.PathLike, total_limit: int | None, keep: str | os.PathLike | None = None
) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain (None or < 1: keep all).

    Never deleted: `keep` (the checkpoint just written, which is not the newest by step when a run resumed from an
    older checkpoint left later ones behind) or, without `keep`, the newest by step. Call it after publishing a
    checkpoint, so that a crash at any moment leaves a complete one.
    """
    if total_limit is None or total_limit < 1:
        return []
    checkpoints = complete_checkpoints(output_dir)
    candidates = [path for path in checkpoints if keep is None or path.resolve() != Path(keep).resolve()]
    removed = candidates[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        # Rename first: a crash mid-delete leaves a .tmp- directory, never a half-deleted checkpoint-N.
        doomed = path.with_name(f"{TMP_PREFIX}deleted-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def save_pipeline_atomically(pipeline, output_dir: str | os.PathLike, finalize=None, **save_kwargs) -> None:
    """`pipeline.save_pretrained(output_dir)` that a kill at any moment cannot leave half-written.

    `finalize(folder)`, when given, completes the written folder (e.g. adds files) before anything is published.
    Until the final rename of model_index.json, a previous complete pipeline in output_dir stays loadable component
    by component; checkpoints and other files in output_dir are left alone.
    """
    output_dir = Path(output_dir)
    tmp = output_dir / f"{TMP_PREFIX}pipeline"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
    if finalize is not None:
        finalize(tmp)
    drop_local_names(tmp)
    index = output_dir / "model_index.json"
    if index.exists():  # from here until the end, the folder has no model_index.json: not loadable, not mixed
        os.replace(index, output_dir / f"{TMP_PREFIX}old-model_index.json")
    for item in sorted(tmp.iterdir()):
        if item.name == "model_index.json":
            continue
        target = output_dir / item.name
        if target.exists():
            old = output_dir / f"{TMP_PREFIX}old-{item.name}"
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            os.replace(target, old)
        os.replace(item, target)
    os.replace(tmp / "model_index.json", index)
    _fsync_dir(output_dir)
    clear_temporary(output_dir)


def drop_local_names(folder: Path) -> None:
    """Remove `_name_or_path` from the component configs of a saved pipeline where it names a local path (diffusers
    records where a component was loaded from; a published model must not carry the trainer's file system)."""
    for config in Path(folder).glob("*/*.json"):
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        name = data.get("_name_or_path") if isinstance(data, dict) else None
        if isinstance(name, str) and (Path(name).is_absolute() or Path(name).exists()):
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
