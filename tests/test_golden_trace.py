"""The golden trace: a tiny deterministic run's per-step losses and final weights, stored in the repository.

Any change to the math of an iteration (a loss, a weight, a stop-gradient, the order of updates, the samples a step
draws) changes this trace, and this test fails. If the change is intended, regenerate the trace deliberately and
let the review see the diff of tests/golden/sim_trace.json:

    .venv/bin/python tests/test_golden_trace.py --regenerate

Two runs on the tiny fixture teacher, batch 4, 6 steps, the default objective and iteration settings:
  default_recipe    2 regression warm-up steps, then 4 SIM steps with the regression term (one target per step);
  divergence_alone  6 SIM steps without the regression term. The fixture's teacher is untrained, so its ODE targets
                    are far off and the regression's gradient dwarfs the divergence's in the first run; this run is
                    what sees the divergence's gradient (its stop-gradient structure) in the weights.
Adam's epsilon is large (close to SGD), so that float noise in tiny gradients is not amplified into +-lr updates: the
trace is then stable across CPUs to far better than the tolerances below, while a real change of the math moves it
by orders of magnitude more.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

TRACE = Path(__file__).parent / "golden" / "sim_trace.json"
CAPTIONS = [
    "a red cat",
    "a blue dog",
    "a green bird",
    "a house by the lake",
    "a small boat on the river",
    "a bright sun",
]
COMMON = [
    "--max_train_steps",
    "6",
    "--train_batch_size",
    "4",
    "--seed",
    "11",
    "--learning_rate",
    "1e-2",
    "--fake_score_learning_rate",
    "1e-2",
    "--adam_epsilon",
    "0.1",
    "--report_to",
    "none",
    "--checkpointing_steps",
    "6",
]
RUNS = {
    "default_recipe": [*COMMON, "--regression_warmup_steps", "2"],
    "divergence_alone": [*COMMON, "--regression_loss_weight", "0"],
}
LOSSES = ("loss/fake_score", "loss/generator", "loss/divergence", "loss/regression")
# Relative tolerances: float32 summation-order noise across machines is ~1e-7 relative per op and, with Adam's large
# epsilon, is not amplified over six steps; the perturbations the trace must catch move it by 1e-2 and more.
LOSS_RTOL, WEIGHT_RTOL = 1e-4, 1e-4


def update_checksums(final: dict, initial: dict) -> dict:
    """Fingerprints of the update final - initial (the initial weights would drown it): its squared norm, its sum,
    and its projection on a fixed random direction."""
    import torch

    update = torch.cat([(final[k].double() - initial[k].double()).flatten() for k in sorted(final)])
    direction = torch.randn(update.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {
        "norm_sq": update.square().sum().item(),
        "sum": update.sum().item(),
        "projection": (update @ direction).item(),
    }


def make_trace(teacher, workdir: Path, args) -> dict:
    from conftest import component_weights, run_trainer, write_captions

    workdir.mkdir(parents=True, exist_ok=True)
    teacher_weights = component_weights(teacher)  # where G and F start
    out = workdir / "run"
    run_trainer(teacher, write_captions(workdir / "captions.txt", CAPTIONS), out, *args)
    steps = [json.loads(line) for line in (out / "logs" / "steps.jsonl").read_text().splitlines()]
    return {
        "args": args,
        "steps": [{"step": row["step"], **{k: row[k] for k in LOSSES if k in row}} for row in steps],
        "generator_update": update_checksums(component_weights(out / "checkpoint-6", "generator"), teacher_weights),
        "fake_score_update": update_checksums(component_weights(out / "checkpoint-6", "fake_score"), teacher_weights),
    }


@pytest.mark.parametrize("run", RUNS)
def test_a_tiny_run_reproduces_the_golden_trace(tiny_teacher_path, tmp_path, run):
    golden = json.loads(TRACE.read_text())[run]
    assert golden["args"] == RUNS[run], "the run's arguments changed: regenerate the trace (module docstring)"
    trace = make_trace(tiny_teacher_path, tmp_path, RUNS[run])
    assert [row["step"] for row in trace["steps"]] == [row["step"] for row in golden["steps"]]
    for row, expected in zip(trace["steps"], golden["steps"]):
        assert row.keys() == expected.keys(), row["step"]
        for key in LOSSES:
            if key in expected:
                assert row[key] == pytest.approx(expected[key], rel=LOSS_RTOL, abs=1e-7), (row["step"], key)
    for network in ("generator_update", "fake_score_update"):
        for key, value in golden[network].items():
            assert trace[network][key] == pytest.approx(value, rel=WEIGHT_RTOL), (network, key)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: {sys.argv[0]} --regenerate")
    sys.path.insert(0, str(Path(__file__).parent))  # conftest's helpers, when run as a script
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_tiny_pixart_pipeline(Path(tmp) / "teacher", seed=0)
        traces = {run: make_trace(teacher, Path(tmp) / run, args) for run, args in RUNS.items()}
    TRACE.parent.mkdir(exist_ok=True)
    TRACE.write_text(json.dumps(traces, indent=2) + "\n")
    print(f"wrote {TRACE}")
