"""Validate the trainer's arguments and inputs before any model is loaded: one clear line per problem.

Everything here is cheap (file headers, configs, the tokenizer, package lookups), so a typo in a path fails in a
second instead of after T5-XXL has been loaded onto eight GPUs. In order: every numeric option's range and every
named choice (NUMERIC_OPTIONS, in one place); the output folder against the teacher; the captions; the teacher (every
component the run needs, its configs, the headers and sizes of its weight files, its tokenizer); the embedding cache
against the captions and text encoder; the checkpoint to resume from (readable, and trained with these settings).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..losses import DIVERGENCES, WEIGHTINGS
from ..teachers import family_of_model_index
from .captions import CaptionSet, UserInputError, load_dataset_captions, long_captions, read_caption_file
from .checkpointing import checkpoint_problem, checkpoint_step, complete_checkpoints, latest_good_checkpoint
from .fingerprints import UnreadableFile, safetensors_header, teacher_fingerprints

logger = logging.getLogger(__name__)

REPORT_TO = ("tensorboard", "wandb", "all", "none")
PIXART_TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
# What the trainer reads of each teacher component: its config file and, for networks, safetensors weights.
REQUIRED_COMPONENTS = {
    "transformer": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "scheduler": ("scheduler_config.json", False),
    "tokenizer": ("tokenizer_config.json", False),
}
PIXART_TRANSFORMER_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "caption_channels")


@dataclass(frozen=True)
class Range:
    """low <= value <= high (open ends exclusive); None bounds are unbounded. Integers or finite floats."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
LEARNING_RATE, PROBABILITY_LIKE, BETA = Range(0, 1, low_open=True), Range(0, 1), Range(0, 1, high_open=True)
FINITE = Range()
# Every numeric option, in one place. None (an option's "use the default") is always allowed. A learning rate above
# 1 is refused with the non-finite ones: with Adam's bounded step, lr <= 1, weight decay <= 1 and the iteration's
# guard on non-finite losses and gradients, an applied update of finite weights is finite.
NUMERIC_OPTIONS = {
    "seed": AT_LEAST_0,
    "max_sequence_length": AT_LEAST_1,
    "dataloader_num_workers": AT_LEAST_0,
    "resolution": AT_LEAST_1,
    "train_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "max_train_steps": AT_LEAST_1,
    "learning_rate": LEARNING_RATE,
    "fake_score_learning_rate": LEARNING_RATE,
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "adam_weight_decay": PROBABILITY_LIKE,
    "adam_epsilon": Range(0, 1, low_open=True),
    "max_grad_norm": FINITE,
    "lr_warmup_steps": AT_LEAST_0,
    "max_consecutive_nonfinite_steps": AT_LEAST_1,
    "guidance_scale": AT_LEAST_0,
    "conditioning_timestep": AT_LEAST_1,
    "huber_c": POSITIVE,
    "sid_alpha": FINITE,
    "min_timestep": AT_LEAST_0,
    "max_timestep": AT_LEAST_0,
    "regression_loss_weight": AT_LEAST_0,
    "regression_every": AT_LEAST_1,
    "regression_num_inference_steps": AT_LEAST_1,
    "regression_huber_c": POSITIVE,
    "regression_warmup_steps": AT_LEAST_0,
    "regression_warmup_learning_rate": LEARNING_RATE,
    "regression_warmup_adam_beta1": BETA,
    "fake_score_lora_rank": AT_LEAST_0,
    "fake_score_lora_alpha": POSITIVE,
    "ema_decay": PROBABILITY_LIKE,
    "checkpointing_steps": AT_LEAST_1,
    "checkpoints_total_limit": AT_LEAST_1,
    "validation_steps": AT_LEAST_1,
    "num_validation_images": AT_LEAST_1,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path} is not readable JSON: {err}.") from None


def _is_local(args) -> bool:
    return Path(args.pretrained_model_name_or_path).exists()


def _teacher_file(args, name: str) -> Path:
    """A small file of the teacher: from a local folder, or from the Hub (or its local cache) for a Hub id."""
    root = Path(args.pretrained_model_name_or_path)
    if root.is_dir():
        return root / name
    if root.exists():
        raise UserInputError(f"--pretrained_model_name_or_path {root} is a file, not a PixArt pipeline folder.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(args.pretrained_model_name_or_path, name, revision=args.revision, cache_dir=args.cache_dir)
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated...: one line for all
        raise UserInputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: not a local folder, and its "
            f"{name} cannot be fetched from the Hub ({type(err).__name__})."
        ) from None


def teacher_fingerprints_of(args) -> dict:
    """The teacher's content fingerprints (`fingerprints.teacher_fingerprints`)."""
    snapshot = _teacher_file(args, "model_index.json").parent
    return teacher_fingerprints(args.pretrained_model_name_or_path, args.revision, args.variant, str(snapshot))


def text_cache_settings(args, dtype) -> dict:
    """What a T5 embedding cache must have been built with to serve this run."""
    return {
        "text_encoder": teacher_fingerprints_of(args)["text_encoder"],
        "max_sequence_length": args.max_sequence_length,
        "clean_caption": args.clean_caption,
        "dtype": str(dtype),
    }


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files `from_pretrained` would read in a local component folder (shards from the index)."""

    def selected(name: str) -> bool:
        stem = name.split(".safetensors")[0]
        return f".{variant}" in stem if variant else "." not in stem

    indexes = [p for p in folder.glob("*.safetensors.index.json") if selected(p.name)]
    if indexes:
        shards = sorted(set(_read_json(indexes[0]).get("weight_map", {}).values()))
        return [folder / shard for shard in shards]
    return sorted(p for p in folder.glob("*.safetensors") if selected(p.name))


def _check_local_components(args, root: Path, index: dict) -> None:
    """Every component the run needs is named in model_index.json and present, with its config and readable
    safetensors weights (headers checked against the files' sizes: a truncated download is caught here)."""
    for name, (config, has_weights) in REQUIRED_COMPONENTS.items():
        folder = root / name
        if not index.get(name) or index[name][0] is None:
            raise UserInputError(f"the teacher {root} has no {name} (model_index.json names none); the run needs it.")
        if not (folder / config).is_file():
            raise UserInputError(f"the teacher's {name} is incomplete: no {name}/{config} in {root}.")
        if not has_weights:
            continue
        files = _weight_files(folder, args.variant)
        if not files:
            wanted = f"*.{args.variant}.safetensors" if args.variant else "*.safetensors"
            raise UserInputError(f"the teacher's {name} has no safetensors weights ({name}/{wanted} in {root}).")
        for file in files:
            try:
                safetensors_header(file)
            except FileNotFoundError:
                raise UserInputError(f"the teacher's {name}/{file.name} is missing (named by its index).") from None
            except (OSError, UnreadableFile) as err:
                raise UserInputError(f"the teacher's {name}/{err}: re-download or re-save it.") from None
    if not any((root / "tokenizer" / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        # transformers would build an empty default tokenizer: every caption would become <unk>.
        raise UserInputError(f"the teacher's tokenizer is incomplete: no tokenizer.json or spiece.model in {root}.")


def _load_tokenizer(args, index: dict):
    import transformers

    library, class_name = index["tokenizer"]
    cls = getattr(transformers, class_name, None)
    if library != "transformers" or cls is None:
        raise UserInputError(f"the teacher's tokenizer is a {library}.{class_name}, not a transformers tokenizer.")
    kwargs = {} if _is_local(args) else {"revision": args.revision, "cache_dir": args.cache_dir}
    try:
        return cls.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **kwargs)
    except Exception as err:  # noqa: BLE001 - any loading error: the teacher's tokenizer is unusable
        raise UserInputError(f"the teacher's tokenizer cannot be loaded ({type(err).__name__}).") from None


def _pixart_transformer_config(args) -> dict:
    config = _read_json(_teacher_file(args, "transformer/config.json"))
    missing = [key for key in PIXART_TRANSFORMER_KEYS if not isinstance(config.get(key), int)]
    if missing:
        raise UserInputError(
            f"the teacher's transformer/config.json is not a PixArt transformer's: no integer {', '.join(missing)}."
        )
    return config


def check_teacher(args, captions: list[str] | None = None) -> dict:
    """The teacher must be a complete PixArt-alpha or PixArt-Σ pipeline; returns facts used later (family, native
    resolution, number of training timesteps, content fingerprints). Warns when `captions` hold captions longer
    than T5 will keep.

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
    if _is_local(args):
        _check_local_components(args, Path(args.pretrained_model_name_or_path), index)
    if args.max_sequence_length is None:
        args.max_sequence_length = family.max_sequence_length
    transformer_config = _pixart_transformer_config(args)
    vae_config = _read_json(_teacher_file(args, "vae/config.json"))
    text_config = _read_json(_teacher_file(args, "text_encoder/config.json"))
    scheduler_config = _read_json(_teacher_file(args, "scheduler/scheduler_config.json"))
    if text_config.get("d_model", transformer_config["caption_channels"]) != transformer_config["caption_channels"]:
        raise UserInputError(
            f"the teacher's text encoder (d_model {text_config.get('d_model')}) does not fit its transformer "
            f"(caption_channels {transformer_config['caption_channels']})."
        )
    blocks = vae_config.get("block_out_channels") or vae_config.get("decoder_block_out_channels") or [0] * 4
    native_resolution = transformer_config["sample_size"] * 2 ** (len(blocks) - 1)
    if args.resolution is not None and args.resolution != native_resolution:
        raise UserInputError(
            f"--resolution {args.resolution} does not match the teacher, which was trained at {native_resolution} px "
            f"(sample_size {transformer_config['sample_size']}); omit --resolution or pass {native_resolution}."
        )
    timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    for name in ("min_timestep", "max_timestep", "conditioning_timestep"):
        value = getattr(args, name)
        if value is not None and value > timesteps - 1:
            raise UserInputError(
                f"--{name} must be <= {timesteps - 1} (the teacher has {timesteps} training timesteps), got {value}."
            )
    tokenizer = _load_tokenizer(args, index)
    if captions:
        cut, sampled = long_captions(captions, tokenizer, args.max_sequence_length)
        if cut:
            logger.warning(
                "%d of %d captions%s are longer than --max_sequence_length %d T5 tokens: T5 keeps their first %d.",
                cut,
                sampled,
                " (an evenly spaced sample)" if sampled < len(set(captions)) else "",
                args.max_sequence_length,
                args.max_sequence_length,
            )
    return {
        "teacher_family": family.name,
        "native_resolution": native_resolution,
        "num_train_timesteps": timesteps,
        "latent_shape": [
            transformer_config.get("in_channels", 4),
            transformer_config["sample_size"],
            transformer_config["sample_size"],
        ],
        "fingerprint": teacher_fingerprints_of(args),
    }


def check_numeric_options(args) -> None:
    """Every option of NUMERIC_OPTIONS in its range (None: the option's default), with one line for the first one
    out of it."""
    for name, valid in NUMERIC_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and not valid.holds(value):
            finite = "a finite number" if isinstance(value, float) else ""
            raise UserInputError(f"--{name} must be {' '.join(filter(None, (finite, str(valid))))}, got {value}.")


def check_arguments(args) -> None:
    check_numeric_options(args)
    if args.divergence not in DIVERGENCES:
        raise UserInputError(f"Unknown --divergence {args.divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    if args.loss_weighting not in WEIGHTINGS:
        raise UserInputError(
            f"Unknown --loss_weighting {args.loss_weighting!r}; choose one of {', '.join(WEIGHTINGS)}."
        )
    from diffusers.optimization import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if args.lr_scheduler not in schedulers:
        raise UserInputError(f"Unknown --lr_scheduler {args.lr_scheduler!r}; choose one of {', '.join(schedulers)}.")
    if args.report_to not in REPORT_TO:
        raise UserInputError(f"Unknown --report_to {args.report_to!r}; choose one of {', '.join(REPORT_TO)}.")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UserInputError("--report_to wandb needs the wandb package: pip install wandb.")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UserInputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.")
    if args.min_timestep > args.max_timestep:
        raise UserInputError(f"Need --min_timestep <= --max_timestep, got {args.min_timestep}, {args.max_timestep}.")
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
        check_hub_arguments(args)


def check_validation_arguments(args) -> None:
    """The options of the validation against the teacher (`training.validation`)."""
    from .validation import COLLAPSE_ACTIONS

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


def check_hub_arguments(args) -> None:
    """A token, and a repo id the Hub accepts, known now rather than after the whole run."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .hub import resolve_token

    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        given = "--hub_model_id" if args.hub_model_id else "--output_dir's name (the default --hub_model_id)"
        raise UserInputError(
            f"{given} {repo_id!r} is not a valid Hub repo id (name or namespace/name: letters, digits, '-', '_', "
            "'.'; at most 96 characters)."
        ) from None
    if not resolve_token(args.hub_token):
        raise UserInputError(
            "--push_to_hub needs a Hub token: pass --hub_token, set HF_TOKEN or run `huggingface-cli login`."
        )


def check_output_dir_apart_from_teacher(args) -> None:
    """The output folder must not be the teacher's folder, lie inside it or contain it (links resolved): the final
    save would replace the teacher's own components."""
    if not _is_local(args):
        return
    teacher = Path(args.pretrained_model_name_or_path).resolve()
    output_dir = Path(args.output_dir).resolve()
    if output_dir == teacher or teacher in output_dir.parents or output_dir in teacher.parents:
        relation = (
            "is the teacher's folder"
            if output_dir == teacher
            else "lies inside the teacher's folder"
            if teacher in output_dir.parents
            else "contains the teacher's folder"
        )
        raise UserInputError(
            f"--output_dir {args.output_dir} {relation} ({teacher}); the trained pipeline would replace the "
            "teacher's files. Give a folder apart from it."
        )


def check_text_embedding_cache(args, caption_set: CaptionSet) -> None:
    """A cache that exists must match these captions and this text encoder (its dtype is checked when known)."""
    if args.text_embedding_cache is None:
        return
    from .text_embeddings import cache_mismatch

    cache_dir = Path(args.text_embedding_cache)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserInputError(f"--text_embedding_cache {cache_dir} is a file, not a directory.")
    problem = cache_mismatch(cache_dir, caption_set.captions, text_cache_settings(args, None), ignore=("dtype",))
    if problem is not None:
        raise UserInputError(f"--text_embedding_cache {cache_dir} does not match: {problem}; give a new directory.")


def _check_fresh_output_dir(args) -> None:
    """A fresh run writes its pipeline, model card and records into output_dir: refuse a folder that holds files of
    those names that no run of this trainer wrote (an earlier run's are its own, and its checkpoints are set aside,
    see lineage.py)."""
    from ..pipeline_sim_one_step import pipeline_code_files
    from .lineage import ARGUMENTS_FILE, HISTORY_FILE, is_global_rank_zero

    # Only the process that owns output_dir checks it: the others may look while it already writes the run's
    # records, and would take them for a stranger's files.
    output_dir = Path(args.output_dir)
    if (
        not is_global_rank_zero()
        or not output_dir.is_dir()
        or (output_dir / ARGUMENTS_FILE).exists()
        or (output_dir / HISTORY_FILE).exists()
    ):
        return
    written = {"model_index.json", "README.md", ARGUMENTS_FILE, HISTORY_FILE, args.logging_dir, "validation"}
    written |= {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    written |= {path.name for path in pipeline_code_files()}
    clashes = sorted(name for name in written if (output_dir / name).exists())
    if clashes:
        raise UserInputError(
            f"--output_dir {output_dir} already holds {', '.join(clashes)}, not written by this trainer; the run "
            "would replace them. Give a new or empty folder."
        )


def resolve_resume(args, teacher_facts: dict, caption_set: CaptionSet) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    `latest` takes the newest readable checkpoint, saying which newer ones it passed over (none at all: a fresh run,
    said too); a named checkpoint must be readable. Either way the checkpoint's recorded settings must match this
    run's (lineage.check_resume_arguments)."""
    from .lineage import check_resume_arguments

    output_dir = Path(args.output_dir)
    if not args.resume_from_checkpoint:
        _check_fresh_output_dir(args)
        return None
    if args.resume_from_checkpoint == "latest":
        path, passed_over = latest_good_checkpoint(output_dir)
        for skipped, why in passed_over.items():
            logger.warning("%s cannot be resumed from: %s.", skipped, why)
        if path is None and passed_over:
            raise UserInputError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir} can be read.")
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a fresh run.", output_dir)
            _check_fresh_output_dir(args)
            return None
        if passed_over:
            logger.warning("Falling back to %s, the newest readable checkpoint.", path.name)
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_absolute() and not path.exists():
            path = output_dir / path
        if not path.is_dir() or path not in complete_checkpoints(path.parent):
            raise UserInputError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no complete checkpoint there."
            )
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserInputError(f"--resume_from_checkpoint {path}: cannot be resumed from: {problem}.")
        if path.parent.resolve() != output_dir.resolve() and complete_checkpoints(output_dir):
            raise UserInputError(
                f"--resume_from_checkpoint {path} lies outside --output_dir {output_dir}, which holds checkpoints of "
                "its own; resume one of those, or give a new --output_dir."
            )
    if args.max_train_steps < checkpoint_step(path):
        raise UserInputError(
            f"--max_train_steps {args.max_train_steps} is below the step of {path.name}; raise it to train on."
        )
    check_resume_arguments(args, path, teacher_facts, caption_set)
    return path


def check_generator_steps(args, num_train_timesteps: int) -> None:
    """--num_generator_steps and --generator_timesteps against the teacher's schedule length: at least one call, as
    many timesteps as calls, strictly decreasing, inside the schedule, starting at --conditioning_timestep when both
    are given."""
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
    """--sharding and --gpu_memory_gb, and the launch they meet (FSDP2 and the memory plan)."""
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
    """All early checks; returns the captions, the teacher's facts and the checkpoint to resume from."""
    check_arguments(args)
    check_output_dir_apart_from_teacher(args)
    check_validation_arguments(args)
    if args.caption_file is not None:
        captions = read_caption_file(args.caption_file, args.caption_column)
    else:
        captions = load_dataset_captions(
            args.dataset_name, args.dataset_config_name, args.caption_column, cache_dir=args.cache_dir
        )
    teacher = check_teacher(args, captions.captions)
    check_text_embedding_cache(args, captions)
    check_generator_steps(args, teacher["num_train_timesteps"])
    resume_path = resolve_resume(args, teacher, captions)
    check_distribution(args, resume_path)
    return captions, teacher, resume_path
