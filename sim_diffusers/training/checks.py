"""Validate the trainer's arguments and inputs before any model is loaded: one clear line per problem.

Everything here is cheap (file headers, configs, package lookups), so a typo in a path fails in a second instead of
after T5-XXL has been loaded onto eight GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
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
    return {"teacher_family": family.name, "native_resolution": native_resolution}


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


def check_validation_arguments(args) -> None:
    """The options of the validation against the teacher (`training.validation`)."""
    from .validation import COLLAPSE_ACTIONS

    if args.validation_steps < 1:
        raise UserInputError(f"--validation_steps must be >= 1, got {args.validation_steps}.")
    if args.validation_num_samples < 2:
        raise UserInputError(
            f"--validation_num_samples must be >= 2 (a spread needs two samples), got {args.validation_num_samples}."
        )
    if not 1 <= args.num_validation_images <= args.validation_num_samples:
        raise UserInputError(
            f"Need 1 <= --num_validation_images <= --validation_num_samples ({args.validation_num_samples}), got "
            f"{args.num_validation_images}."
        )
    if args.validation_teacher_steps < 1:
        raise UserInputError(f"--validation_teacher_steps must be >= 1, got {args.validation_teacher_steps}.")
    if not 0 <= args.validation_collapse_threshold < 1:
        raise UserInputError(
            "Need 0 <= --validation_collapse_threshold < 1 (a ratio to the teacher's diversity, which is 1), got "
            f"{args.validation_collapse_threshold}."
        )
    if args.validation_collapse_action not in COLLAPSE_ACTIONS:
        raise UserInputError(
            f"Unknown --validation_collapse_action {args.validation_collapse_action!r}; choose one of "
            f"{', '.join(COLLAPSE_ACTIONS)}."
        )
    prompts = args.validation_prompts or []
    if len(set(prompts)) != len(prompts):
        repeated = sorted({p for p in prompts if prompts.count(p) > 1})
        raise UserInputError(f"--validation_prompts repeats {repeated[0]!r}; give each prompt once.")
    if args.validation_collapse_action == "stop" and not prompts:
        raise UserInputError("--validation_collapse_action stop needs --validation_prompts to validate on.")


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


def validate(args) -> tuple[CaptionSet, dict, Path | None]:
    """All early checks; returns the captions, teacher facts and the checkpoint to resume from."""
    check_arguments(args)
    check_validation_arguments(args)
    if args.caption_file is not None:
        captions = read_caption_file(args.caption_file, args.caption_column)
    else:
        captions = load_dataset_captions(
            args.dataset_name, args.dataset_config_name, args.caption_column, cache_dir=args.cache_dir
        )
    teacher = check_teacher(args)
    return captions, teacher, resolve_resume(args)
