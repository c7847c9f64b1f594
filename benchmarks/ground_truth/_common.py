"""What the ground-truth scripts share: the world and teacher options, and the set-up of their process."""

from __future__ import annotations

import argparse
import os

import torch

from sim_diffusers.ground_truth import GaussianMixtureWorld, TeacherConfig

EVALUATION_SEED = 10_000  # the held-out noise every generator is scored on (caption i from seed EVALUATION_SEED + i)


def add_world_and_teacher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("world and teacher")
    group.add_argument(
        "--world",
        choices=("default", "quick"),
        default="default",
        help="default: 4 captions x 3 modes in a 4x8x8 latent; quick: 2 x 2 in 4x4x4, for CI.",
    )
    group.add_argument("--world_seed", type=int, default=0)
    group.add_argument(
        "--latent_side",
        type=int,
        default=8,
        help="The default world at a latent of 4 x SIDE x SIDE (8, 16, 32, 64: D = 256 .. 16,384, the same modes, "
        "patterns upsampled, the teacher's patch grown with the side so that it keeps 16 tokens).",
    )
    # Teacher training overrides (TeacherConfig); named apart from the distillation's options of the same kind.
    group.add_argument(
        "--teacher_train_steps",
        "--train_steps",
        dest="teacher_train_steps",
        type=int,
        default=None,
        help="Override the teacher's training steps.",
    )
    group.add_argument("--teacher_batch_size", type=int, default=None, help="Override the teacher's training batch.")
    group.add_argument(
        "--teacher_learning_rate", type=float, default=None, help="Override the teacher's learning rate."
    )
    group.add_argument(
        "--teacher_num_layers",
        "--num_layers",
        dest="teacher_num_layers",
        type=int,
        default=None,
        help="Transformer blocks of the teacher (and so of the generator that starts as its copy).",
    )
    group.add_argument(
        "--cache_dir",
        default=None,
        help="Where teachers are cached. Default: $SIM_DIFFUSERS_CACHE/ground_truth if set, else "
        "$XDG_CACHE_HOME (or ~/.cache)/sim_diffusers/ground_truth.",
    )
    group.add_argument("--rebuild", action="store_true", help="Retrain even if the teacher is cached.")
    group.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads. One is the robust choice for these tiny models on a shared machine.",
    )


def world_and_config(args) -> tuple[GaussianMixtureWorld, TeacherConfig]:
    """The world and teacher config the arguments name. Also sets the process up as every ground-truth script
    wants it: torch threads, the Hub offline, and diffusers / transformers quiet (`quiet_libraries`)."""
    torch.set_num_threads(args.num_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    names = ("train_steps", "batch_size", "learning_rate", "num_layers")
    overrides = {k: getattr(args, f"teacher_{k}") for k in names if getattr(args, f"teacher_{k}") is not None}
    side = getattr(args, "latent_side", 8)
    if args.world == "quick":
        if side != 8:
            raise SystemExit("error: --latent_side applies to the default world only.")
        return GaussianMixtureWorld.quick(seed=args.world_seed), TeacherConfig.quick(**overrides)
    try:
        world = GaussianMixtureWorld.at_latent_side(side, seed=args.world_seed)
    except ValueError as err:
        raise SystemExit(f"error: --latent_side {side}: {err}") from None
    return world, TeacherConfig.for_world(world, **overrides)


def quiet_libraries() -> None:
    """No progress bars ("Loading pipeline components", "Loading weights") and no info logs from diffusers and
    transformers: a script's output is its own table. Errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
