"""Validate the trainer's arguments and inputs before any model is loaded: one clear line per problem.

Everything here is cheap (file headers, configs, package lookups), so a typo in a path fails in a second instead of
after T5-XXL has been loaded onto eight GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from ..losses import DIVERGENCES
from ..teachers import family_of_model_index
from .captions import CaptionSet, UserInputError, load_dataset_captions, read_caption_file
from .checkpointing import complete_checkpoints, latest_checkpoint

logger = logging.getLogger(__name__)

REPORT_TO = ("tensorboard", "wandb", "all", "none")
PIXART_TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path} is not readable JSON: {err}.") from None


def _teacher_file(args, name: str) -> Path:
    """A small file of the teacher: from a local folder, or from the Hub (or its local cache) for a Hub id."""
    root = Path(args.pretrained_model_name_or_path)
    if root.is_dir():
        return root / name
    if root.exists():
        raise UserInputError(f"--pretrained_model_name_or_path {root} is a file, not a PixArt pipeline folder.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(args.pretrained_model_name_or_path, name, revision=args.revision))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated...: one line for all
        raise UserInputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: not a local folder, and its "
            f"{name} "
            f"cannot be fetched from the Hub ({type(err).__name__})."
        ) from None


def check_teacher(args) -> dict:
    """The teacher must be a PixArt-alpha or PixArt-Σ pipeline; returns facts used later (family, native resolution).

    Resolves `--max_sequence_length` to the family's T5 length (120 or 300) when it was not given.
    """
    index_path = _teacher_file(args, "model_index.json")
    if not index_path.is_file():
        found = sorted(p.name for p in index_path.parent.iterdir())[:8] if index_path.parent.is_dir() else []
        raise UserInputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is not a diffusers pipeline "
            f"(no model_index.json; found {found})."
        )
    index = _read_json(index_path)
    transformer = index.get("transformer")
    family = family_of_model_index(index)
    if family is None or not transformer or transformer[1] not in PIXART_TRANSFORMER_CLASSES:
        raise UserInputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is a "
            f"{index.get('_class_name')} (transformer {transformer}), not a PixArt-alpha or PixArt-Σ pipeline."
        )
    if args.max_sequence_length is None:
        args.max_sequence_length = family.max_sequence_length
    elif args.max_sequence_length < 1:
        raise UserInputError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}.")
    transformer_config = _read_json(_teacher_file(args, "transformer/config.json"))
    vae_config = _read_json(_teacher_file(args, "vae/config.json"))
    blocks = vae_config.get("block_out_channels") or vae_config.get("decoder_block_out_channels") or [0] * 4
    native_resolution = transformer_config["sample_size"] * 2 ** (len(blocks) - 1)
    if args.resolution is not None and args.resolution != native_resolution:
        raise UserInputError(
            f"--resolution {args.resolution} does not match the teacher, which was trained at {native_resolution} px "
            f"(sample_size {transformer_config['sample_size']}); omit --resolution or pass {native_resolution}."
        )
    side = transformer_config["sample_size"]
    latent_shape = [transformer_config.get("in_channels", 4), side, side]
    return {"teacher_family": family.name, "native_resolution": native_resolution, "latent_shape": latent_shape}


def check_arguments(args) -> None:
    if args.train_batch_size < 1:
        raise UserInputError(f"--train_batch_size must be >= 1, got {args.train_batch_size}.")
    if args.max_train_steps < 1:
        raise UserInputError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.gradient_accumulation_steps < 1:
        raise UserInputError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}.")
    if args.divergence not in DIVERGENCES:
        raise UserInputError(f"Unknown --divergence {args.divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    if args.report_to not in REPORT_TO:
        raise UserInputError(f"Unknown --report_to {args.report_to!r}; choose one of {', '.join(REPORT_TO)}.")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UserInputError("--report_to wandb needs the wandb package: pip install wandb.")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UserInputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.")
    if not 0 <= args.min_timestep <= args.max_timestep:
        raise UserInputError(
            f"Need 0 <= --min_timestep <= --max_timestep, got {args.min_timestep}, {args.max_timestep}."
        )
    if args.regression_loss_weight < 0 or args.regression_every < 1 or args.regression_num_inference_steps < 1:
        raise UserInputError(
            "Need --regression_loss_weight >= 0, --regression_every >= 1 and --regression_num_inference_steps >= 1, "
            "got "
            f"{args.regression_loss_weight}, {args.regression_every}, {args.regression_num_inference_steps}."
        )
    if args.regression_warmup_steps < 0 or (
        args.regression_warmup_learning_rate is not None and args.regression_warmup_learning_rate <= 0
    ):
        raise UserInputError(
            "Need --regression_warmup_steps >= 0 and --regression_warmup_learning_rate > 0, got "
            f"{args.regression_warmup_steps}, {args.regression_warmup_learning_rate}."
        )
    for name in ("adam_beta1", "adam_beta2", "regression_warmup_adam_beta1"):
        beta = getattr(args, name)
        if not 0 <= beta < 1:
            raise UserInputError(f"Need 0 <= --{name} < 1, got {beta}.")
    if args.regression_huber_c is not None and args.regression_huber_c <= 0:
        raise UserInputError(f"Need --regression_huber_c > 0, got {args.regression_huber_c}.")
    if args.regression_warmup_steps > 0 and args.regression_loss_weight == 0:
        raise UserInputError(
            "--regression_warmup_steps trains on the regression term: it needs --regression_loss_weight > 0."
        )
    if (args.caption_file is None) == (args.dataset_name is None):
        raise UserInputError("Give exactly one caption source: --caption_file or --dataset_name.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"--output_dir {output_dir} is a file; give a directory.")
    if args.push_to_hub:
        from .hub import resolve_token

        if not resolve_token(args.hub_token):
            raise UserInputError(
                "--push_to_hub needs a Hub token: pass --hub_token, set HF_TOKEN or run `huggingface-cli login`."
            )


def resolve_resume(args) -> Path | None:
    """The checkpoint to resume from, or None. `latest` with no checkpoint starts fresh (and says so)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        path = latest_checkpoint(args.output_dir)
        if path is None:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting a fresh run.", args.output_dir
            )
        return path
    path = Path(args.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(args.output_dir) / path
    if not path.is_dir() or path not in complete_checkpoints(path.parent):
        raise UserInputError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no complete checkpoint there.")
    return path


def check_generator_steps(args) -> None:
    """--num_generator_steps and --generator_timesteps (against the teacher's schedule length, read from its scheduler
    config): at least one call, as many timesteps as calls, strictly decreasing, inside the schedule, starting at
    --conditioning_timestep when both are given."""
    from ..generator import check_generator_timesteps

    steps, timesteps = args.num_generator_steps, args.generator_timesteps
    if steps < 1:
        raise UserInputError(f"--num_generator_steps must be >= 1, got {steps}.")
    if timesteps is None:
        return
    if len(timesteps) != steps:
        raise UserInputError(
            f"--generator_timesteps gives {len(timesteps)} timesteps for --num_generator_steps {steps}."
        )
    config_path = _teacher_file(args, "scheduler/scheduler_config.json")
    num_train_timesteps = _read_json(config_path).get("num_train_timesteps", 1000) if config_path.is_file() else 1000
    try:
        check_generator_timesteps(timesteps, num_train_timesteps)
    except ValueError as err:
        raise UserInputError(f"--generator_timesteps: {err}") from None
    if args.conditioning_timestep is not None and timesteps[0] != args.conditioning_timestep:
        raise UserInputError(
            f"--generator_timesteps must start at --conditioning_timestep {args.conditioning_timestep}, "
            f"got {timesteps}."
        )


def check_distribution(args, resume_path: Path | None) -> None:
    """--sharding and --gpu_memory_gb, and the launch they meet (issue 21: FSDP2 and the memory plan)."""
    from .models import SHARDING_STRATEGIES

    if args.sharding not in SHARDING_STRATEGIES:
        raise UserInputError(f"Unknown --sharding {args.sharding!r}; choose one of {', '.join(SHARDING_STRATEGIES)}.")
    if not args.gpu_memory_gb > 0:
        raise UserInputError(f"--gpu_memory_gb must be > 0, got {args.gpu_memory_gb}.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserInputError(
            "Accelerate's FSDP plugin (distributed_type: FSDP) is not used by this trainer; launch with a multi-GPU "
            "config and pass --sharding fsdp (examples/accelerate_configs/8_gpus.yaml)."
        )
    if args.sharding != "none":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
        if world_size < 2:
            raise UserInputError(
                f"--sharding {args.sharding} splits the networks over processes, but this run has {world_size}; "
                "launch it with accelerate launch --multi_gpu --num_processes N (N >= 2), or use --sharding none."
            )
        mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if mixed_precision == "fp16":
            raise UserInputError(
                f"--sharding {args.sharding} trains in bf16 or fp32, not fp16 (its gradient scaler would have to be "
                "sharded too); use --mixed_precision bf16."
            )
        if args.use_8bit_adam:
            raise UserInputError(
                f"--use_8bit_adam does not run on sharded parameters; drop it or --sharding {args.sharding}."
            )
        if args.max_grad_norm <= 0:
            raise UserInputError(
                f"--sharding {args.sharding} needs --max_grad_norm > 0: the non-finite guard reads the gradient norm "
                "over all shards, which clipping computes."
            )
    if resume_path is not None:
        from .models import SHARDED_OPTIMIZER_DIR

        written_sharded = (resume_path / SHARDED_OPTIMIZER_DIR).is_dir()
        if written_sharded != (args.sharding != "none"):
            raise UserInputError(
                f"--resume_from_checkpoint {resume_path.name} was written "
                f"{'with FSDP2 (--sharding fsdp or fsdp_teacher)' if written_sharded else 'with --sharding none'}; "
                "resume it with the same kind of --sharding (the optimiser states are stored differently)."
            )


def validate(args) -> tuple[CaptionSet, dict, Path | None]:
    """All early checks; returns the captions, teacher facts and the checkpoint to resume from."""
    check_arguments(args)
    if args.caption_file is not None:
        captions = read_caption_file(args.caption_file, args.caption_column)
    else:
        captions = load_dataset_captions(
            args.dataset_name, args.dataset_config_name, args.caption_column, cache_dir=args.cache_dir
        )
    teacher = check_teacher(args)
    check_generator_steps(args)
    resume_path = resolve_resume(args)
    check_distribution(args, resume_path)
    return captions, teacher, resume_path
