"""One run at a time per output_dir: a lock file held for the run's lifetime.

`OUTPUT_DIR/training.lock` holds JSON: the holder's PID, host, start time and (on Linux) the process's own start
time, so that a PID reused by another process after a reboot is not mistaken for the holder. A second run refuses
with one line naming the holder. A lock left by a run that was killed (SIGKILL, power loss) is stale when its PID is
gone, or belongs to a younger process, on the same host: the next run takes it over and says so. A lock from another
host cannot be checked from here; the message says how to remove it if that run is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from .captions import UserInputError

logger = logging.getLogger(__name__)

LOCK_NAME = "training.lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class OutputDirLock:
    """`with OutputDirLock(output_dir): ...`, or `acquire()` / `release()`. Raises UserInputError when held."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "process_start": _process_start(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        self.held = False
        self.took_over: dict | None = None

    def _holder(self) -> dict | None:
        """The current lock's record; {} when it is unreadable (a holder killed while writing it)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:
            # Written by O_EXCL create then one write: empty or partial only if its writer died in between (or is
            # writing right now, hence the age).
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if holder.get("host") != self.record["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        started = holder.get("process_start")
        return started is not None and _process_start(pid) not in (None, started)

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released in between: try again
                if not self._stale(holder):
                    raise UserInputError(self._held_message(holder)) from None
                # Renaming is atomic: of two runs taking over the same stale lock, only one moves it.
                aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                self.took_over = holder
                continue
            self.held = True  # from here release() removes it, even if interrupted before the record is written
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            if self.took_over is not None:
                logger.warning(
                    "Took over the stale lock of %s: PID %s on %s (started %s) is no longer running.",
                    self.path,
                    self.took_over.get("pid", "?"),
                    self.took_over.get("host", "?"),
                    self.took_over.get("started", "?"),
                )
            return self
        raise UserInputError(f"could not take the lock {self.path}: other runs keep taking it.")

    def _held_message(self, holder: dict) -> str:
        where = f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        message = f"--output_dir {self.path.parent} is in use by another training run ({where})"
        if holder.get("host") != self.record["host"]:
            message += f"; if that run is no longer running, delete {self.path}"
        return message + "."

    def release(self) -> None:
        holder = self._holder()
        if self.held and holder is not None and holder.get("token", self.record["token"]) == self.record["token"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
