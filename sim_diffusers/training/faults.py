"""Test-only fault injection for the trainer, switched on by one environment variable and off by default.

    SIM_DIFFUSERS_TEST_FAULTS="nan:generator_loss@3,4;kill:checkpoint@4;kill:step@6;kill:final_save@0"

`nan:WHERE@STEPS` turns that loss into NaN at those (0-based) steps; `nan:generator_weights@STEP` sets one generator
weight to NaN just before the checkpoint of that step is checked and saved, `nan:final_weights@0` just before the
final save's check. `kill:WHERE@STEP` sends SIGKILL to the process at that point: inside a step after the backward
passes and before the optimiser steps ("step"), after the checkpoint's files are written but before it is published
("checkpoint", step = the checkpoint's step), or between writing the final pipeline and publishing it ("final_save").
Tests use it to prove crash safety, the NaN guard and the finiteness checks before saves.
"""

from __future__ import annotations

import os
import signal

import torch

from .iteration import IterationHooks

ENVIRONMENT_VARIABLE = "SIM_DIFFUSERS_TEST_FAULTS"


class FaultPlan(IterationHooks):
    """The faults of one run; installed as the iteration's hooks, so the loop itself carries no test code."""

    def __init__(self, spec: str = ""):
        self.nan: dict[str, set[int]] = {}
        self.kill: dict[str, set[int]] = {}
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            kind, _, rest = item.partition(":")
            where, _, steps = rest.partition("@")
            table = {"nan": self.nan, "kill": self.kill}.get(kind)
            if table is None or not where or not steps:
                raise ValueError(f"bad {ENVIRONMENT_VARIABLE} entry {item!r}")
            table.setdefault(where, set()).update(int(s) for s in steps.split(","))

    def maybe_corrupt(self, where: str, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step in self.nan.get(where, ()):
            return loss * float("nan")
        return loss

    def maybe_poison(self, where: str, step: int, module: torch.nn.Module) -> None:
        if step in self.nan.get(where, ()):
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")

    def maybe_kill(self, where: str, step: int) -> None:
        if step in self.kill.get(where, ()):
            os.kill(os.getpid(), signal.SIGKILL)

    # IterationHooks
    def generator_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return self.maybe_corrupt("generator_loss", step, loss)

    def before_generator_update(self, step: int) -> None:
        self.maybe_kill("step", step)


def from_environment() -> FaultPlan:
    return FaultPlan(os.environ.get(ENVIRONMENT_VARIABLE, ""))
