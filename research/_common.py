"""What the research instruments share beyond `benchmarks.ground_truth._common` (re-exported here): the set-up,
scoring and records of the in-process loops, deeper generators, and loading the weights they save."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.ground_truth._common import (  # noqa: F401  (re-exported: the instruments import them from here)
    EVALUATION_SEED,
    add_world_and_teacher_args,
    world_and_config,
)
from sim_diffusers.losses import regression_loss


def add_extra_layers_arg(parser: argparse.ArgumentParser) -> None:
    """--extra_layers (see `deepen`), refused at parse time when negative."""

    def non_negative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    parser.add_argument(
        "--extra_layers",
        type=non_negative,
        default=0,
        help="Give the generator this many more transformer blocks than the teacher (copies of teacher "
        "blocks that start as identities, see deepen); to start SIM from such a fit, pass the same "
        "value to screen.py with --init_generator.",
    )


# ---------------------------------------------------------------------------------------------------------------------
# The in-process loops (screen.py, fit_ode_map.py): teacher, embeddings, scoring and records, written once.


def load_teacher_setup(args):
    """(world, teacher pipeline, (embeds, mask, empty_embeds, empty_mask) per caption, one-step pipeline at
    --conditioning_timestep, whose `conditioning_timestep` is the resolved t*)."""
    from diffusers import PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.ground_truth import encode_world_captions, load_or_build_teacher

    world, config = world_and_config(args)
    teacher_pipe = PixArtAlphaPipeline.from_pretrained(load_or_build_teacher(world, config, args.cache_dir))
    with torch.no_grad():
        embeddings = tuple(x.detach() for x in encode_world_captions(teacher_pipe, world))
    one_step = SIMOneStepPipeline.from_teacher(teacher_pipe, conditioning_timestep=args.conditioning_timestep)
    return world, config, teacher_pipe, embeddings, one_step


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode without gradients for the block; its train/eval mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def mean_squared_error(samples, targets) -> float:
    """The per-caption mean squared errors of latents against their targets, averaged over captions."""
    return torch.stack([(x - y).square().mean() for x, y in zip(samples, targets)]).mean().item()


def sample_and_score(one_step, model, world, num_samples):
    """`model` as the one-step generator on the evaluation noise: (latents per caption, rounded mean metrics). The
    model's train/eval mode is restored."""
    from sim_diffusers.ground_truth import evaluate_pipeline_latents, sample_pipeline_latents

    with evaluating(model):
        one_step.transformer = model
        samples = sample_pipeline_latents(one_step, world, num_samples, seed=EVALUATION_SEED)
        metrics = evaluate_pipeline_latents(world, samples)["mean"]
    return samples, {k: round(v, 4) for k, v in metrics.items()}


def save_weights(model, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def deepen(model, extra_layers: int):
    """`model` with `extra_layers` more blocks, copies of teacher blocks inserted right after them (every block gets
    extra_layers // L copies, and evenly spaced blocks one more), whose output projections (self-attention,
    cross-attention, feed-forward) are zeroed so that each starts as the identity: the deeper network computes exactly
    the teacher's function at step 0 and can only add to it."""
    blocks = list(model.transformer_blocks)
    if extra_layers < 0:
        raise ValueError(f"--extra_layers must be >= 0, got {extra_layers}")
    rest = extra_layers % len(blocks)
    spaced = {round(i * len(blocks) / rest) for i in range(rest)}
    deeper = []
    for i, block in enumerate(blocks):
        deeper.append(block)
        for _ in range(extra_layers // len(blocks) + (i in spaced)):
            twin = copy.deepcopy(block)
            for linear in (twin.attn1.to_out[0], twin.attn2.to_out[0], twin.ff.net[-1]):
                torch.nn.init.zeros_(linear.weight)
                torch.nn.init.zeros_(linear.bias)
            deeper.append(twin)
    model.transformer_blocks = torch.nn.ModuleList(deeper)
    model.register_to_config(num_layers=len(deeper))
    return model


def generator_path(text: str) -> Path:
    """Where a generator's weights are: a checkpoint, pipeline or transformer folder of `distill.py` (its
    config.json), or a safetensors file of `screen.py --save` / `fit_ode_map.py --save`. Exits with one line if
    none."""
    path = Path(text)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for candidate in (path / "generator", path / "transformer", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise SystemExit(
        f"error: {path} holds no generator (no config.json in it, its generator/ or its transformer/, "
        "and it is not a .safetensors file)."
    )


def load_generator(path: Path, teacher_transformer):
    """The generator at `generator_path(...)` `path`. A safetensors file holds only weights: the network is the
    teacher's, deepened (see `deepen`) to as many blocks as the file has."""
    from diffusers import PixArtTransformer2DModel

    if path.suffix != ".safetensors":
        return PixArtTransformer2DModel.from_pretrained(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        blocks = {int(key.split(".")[1]) for key in f.keys() if key.startswith("transformer_blocks.")}
    model = deepen(copy.deepcopy(teacher_transformer), max(blocks) + 1 - len(teacher_transformer.transformer_blocks))
    load_weights(model, path)
    return model


def load_weights(model, path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def markdown_table(rows: dict, columns) -> str:
    """One line per sampler (the keys of `rows`) with its `columns` to three decimals; a missing value prints nan."""
    lines = ["| sampler | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [
        f"| {name} | " + " | ".join(f"{r.get(c, math.nan):.3f}" for c in columns) + " |" for name, r in rows.items()
    ]
    return "\n".join(lines)


def append_record(args, curve, start: float) -> None:
    """One JSON line per run in --out: its name, arguments, curve and wall time."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(
            json.dumps({"name": args.name, "args": vars(args), "curve": curve, "seconds": round(time.time() - start)})
            + "\n"
        )


def tolerant_regression_loss(x0, target, distance: str = "l2", huber_c=None, tolerance: float = 0.0):
    """`sim_diffusers.losses.regression_loss` of the difference shortened by `tolerance` r (latent norm units),
    (1 - r / ||x0 - target||)+ (x0 - target): a sample within r of its target is not pulled at all, one further out
    is pulled straight at it. `screen.py --regression_tolerance` screened it; it changed nothing, so the package
    dropped the option."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    if tolerance == 0:
        return regression_loss(x0, target, distance, huber_c)
    diff = x0.float() - target.float()
    norm = diff.flatten(1).norm(dim=1).clamp_min(1e-12)
    shrink = (1.0 - tolerance / norm).clamp_min(0.0).view(-1, *([1] * (diff.dim() - 1)))
    return regression_loss(target.float() + shrink * diff, target.float(), distance, huber_c)
