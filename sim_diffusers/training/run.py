"""Pieces of the training script that are not the algorithm: state, optimisers, text, checkpoint hooks (with the
finiteness check before every save), resume, validation.

Only this module and the script import Accelerate-facing code paths; the math lives in `step.py` and `..losses`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import faults
from .captions import UserInputError
from .checkpointing import COMPLETE_MARKER
from .iteration import MicroBatch
from .step import Conditioning
from .text_embeddings import OnlineTextEncoder, TextEmbeddingCache, build_text_embedding_cache

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a checkpoint must restore beyond weights, optimisers and RNG: the step (= caption-stream position) and
    the non-finite-step counters; and what it records of the run that wrote it (`run`: arguments, the teacher's and
    captions' content fingerprints, the global batch; see lineage.py), which a resume compares with its own. Its
    JSON file is also the marker of a complete checkpoint."""

    step: int = 0
    skipped: dict = field(default_factory=lambda: {"generator": 0, "fake_score": 0})
    consecutive_bad: int = 0
    run: dict = field(default_factory=dict)

    def advance(self, result) -> None:
        """Count the skipped updates of a finished iteration (an `iteration.IterationResult`); move to the next
        step."""
        bad = False
        for name, finite in (("fake_score", result.fake_score_finite), ("generator", result.generator_finite)):
            if not finite:
                self.skipped[name] += 1
                bad = True
        self.consecutive_bad = self.consecutive_bad + 1 if bad else 0
        self.step += 1

    def save(self, directory: Path) -> None:
        data = {"step": self.step, "skipped": self.skipped, "consecutive_bad": self.consecutive_bad, "run": self.run}
        (Path(directory) / COMPLETE_MARKER).write_text(json.dumps(data, indent=2))

    def load(self, directory: Path) -> None:
        """The counters of a checkpoint (`run` stays this run's own)."""
        data = json.loads((Path(directory) / COMPLETE_MARKER).read_text())
        self.step, self.skipped, self.consecutive_bad = data["step"], data["skipped"], data["consecutive_bad"]


class NonFiniteTraining(RuntimeError):
    """The run cannot produce a model worth saving (non-finite weights, or a generator that never updated); the
    message is one line and names the last good checkpoint. The trainer exits with code 3."""


def nonfinite_tensors(named_tensors) -> list[str]:
    """Names of the tensors holding a NaN or an Inf (one device sync for all). A sharded tensor (DTensor) is checked
    by its local shard; the caller reduces the verdict over processes."""
    named = [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named_tensors]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, flags.tolist()) if not ok]


def _last_good_checkpoint(output_dir) -> str:
    from .checkpointing import latest_checkpoint

    last = latest_checkpoint(output_dir)
    return f"Last good checkpoint: {last if last else 'none'}."


def ensure_finite_weights(accelerator, named_tensors, what: str, output_dir) -> None:
    """Raise NonFiniteTraining, on every process alike, if any process holds a non-finite tensor among
    `named_tensors` ((name, tensor) pairs): nothing non-finite is ever saved."""
    bad = nonfinite_tensors(named_tensors)
    count = torch.tensor([float(len(bad))], device=accelerator.device)
    if accelerator.reduce(count, reduction="sum").item() > 0:
        first = f" (e.g. {bad[0]})" if bad else ""
        raise NonFiniteTraining(
            f"{what} are not finite{first}; nothing was saved. {_last_good_checkpoint(output_dir)}"
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and learning-rate schedules of both networks, with the trainer's defaults (its options of these names).

    The fake score learns 10x faster than the generator: F must track the generator's distribution. beta1 = 0 for
    both, as SiD: momentum on SIM's moving target hurts (the regression warm-up has its own beta1, see
    `iteration.IterationConfig`).
    """

    learning_rate: float = 5e-6
    fake_score_learning_rate: float = 5e-5
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0

    @classmethod
    def from_namespace(cls, namespace) -> OptimizerConfig:
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


def build_optimizer(config: OptimizerConfig, parameters, learning_rate: float):
    kwargs = dict(
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    parameters = [p for p in parameters if p.requires_grad]
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    # The fused kernel: one launch for all parameters instead of several per tensor (measured 3x faster step).
    return torch.optim.AdamW(parameters, fused=True, **kwargs)


def build_optimisation(config: OptimizerConfig, generator, networks, max_train_steps: int, num_processes: int = 1):
    """(generator optimiser, fake-score optimiser, their learning-rate schedules), not yet prepared."""
    from diffusers.optimization import get_scheduler

    opt_g = build_optimizer(config, generator.parameters(), config.learning_rate)
    opt_f = build_optimizer(config, networks.fake_score_parameters(), config.fake_score_learning_rate)
    # Accelerate steps a prepared scheduler once per process per optimiser step.
    schedule = dict(
        num_warmup_steps=config.lr_warmup_steps * num_processes, num_training_steps=max_train_steps * num_processes
    )
    sched_g = get_scheduler(config.lr_scheduler, optimizer=opt_g, **schedule)
    sched_f = get_scheduler(config.lr_scheduler, optimizer=opt_f, **schedule)
    return opt_g, opt_f, sched_g, sched_f


class StepBatches:
    """`batches(step)`: this process's micro-batches of a step, as `iteration.MicroBatch`es: captions and randomness
    from the caption stream (per global sample, so independent of the world size), text conditioning from T5 or the
    embedding cache, the empty prompt's embedding as the negative, and the teacher's micro-conditions."""

    def __init__(
        self,
        stream,
        text,
        generator,
        resolution: int,
        latent_shape,
        batch_size: int,
        accumulation: int,
        rank: int,
        world_size: int,
        device,
        dtype,
    ):
        self.stream, self.text, self.generator = stream, text, generator
        self.negative = text.negative()
        self.resolution, self.latent_shape = resolution, latent_shape
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rank, self.world_size = rank, world_size
        self.device, self.dtype = device, dtype

    def conditioning(self, captions) -> Conditioning:
        from ..generator import micro_conditions

        n = len(captions)
        embeds, mask = self.text(captions)
        negative_embeds, negative_mask = self.negative
        return Conditioning(
            embeds.to(self.device),
            mask.to(self.device),
            negative_embeds.expand(n, -1, -1).to(self.device),
            negative_mask.expand(n, -1).to(self.device),
            micro_conditions(self.generator, n, self.resolution, self.resolution, self.device, self.dtype),
        )

    def __call__(self, step: int) -> list[MicroBatch]:
        batches = []
        for m in range(self.accumulation):
            where = (step, m, self.batch_size, self.rank, self.world_size)
            captions, randomness = self.stream.batch(*where, self.latent_shape)
            batches.append(
                MicroBatch(
                    self.conditioning(captions), randomness.to(self.device), self.stream.local_positions(*where)
                )
            )
        return batches


class StepLog:
    """Every step's scalars as one JSON line in OUTPUT_DIR/logs/steps.jsonl, whatever tracker is used (main process).

    On a resume the lines beyond the resumed step are dropped first, so the file follows the run that continues."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, logs: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Text conditioning


def needs_text_encoder(args) -> bool:
    """T5 must be loaded unless a complete cache already holds the captions and the validation prompts."""
    if args.text_embedding_cache is None:
        return True
    cache_dir = Path(args.text_embedding_cache)
    if not (cache_dir / "index.json").is_file():
        return True
    return bool(args.validation_prompts) and not TextEmbeddingCache.has_extra(cache_dir, args.validation_prompts)


def load_text_conditioning(args, accelerator, teacher_pipe, captions, dtype):
    """A callable captions -> (embeds, mask) with `.negative()` and `.extra(prompts)`; builds the cache if asked (or
    reuses it when it was built for these captions and this text encoder, by content)."""
    from .checks import text_cache_settings

    device = accelerator.device
    encoder = None
    if teacher_pipe.text_encoder is not None:
        teacher_pipe.text_encoder.to(device).requires_grad_(False).eval()
        encoder = OnlineTextEncoder(teacher_pipe, device, dtype, args.max_sequence_length, args.clean_caption)
    if args.text_embedding_cache is None:
        return encoder
    from tqdm.auto import tqdm

    bar = tqdm(total=len(set(captions)), desc="T5 embedding cache", disable=not accelerator.is_local_main_process)
    build_text_embedding_cache(
        args.text_embedding_cache,
        captions,
        encoder,
        text_cache_settings(args, dtype),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        progress=lambda n: bar.update(n * accelerator.num_processes),
        extra_prompts=args.validation_prompts,
    )
    bar.close()
    return TextEmbeddingCache(args.text_embedding_cache, device, dtype)


def validation_embeddings(args, text):
    """The validation prompts' text conditioning and the empty prompt's (`validation.ValidationSet`), computed once,
    so validation never needs T5; None without validation prompts."""
    if not args.validation_prompts:
        return None
    from .validation import ValidationSet

    if isinstance(text, TextEmbeddingCache):
        embeds, mask = text.extra(args.validation_prompts)
    else:
        embeds, mask = text(args.validation_prompts)
    return ValidationSet(list(args.validation_prompts), embeds, mask, *text.negative())


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint hooks: G, F and EMA in diffusers format (safetensors), not as Accelerate's anonymous model files.


def trained_tensors(generator, networks, ema) -> list:
    """(name, tensor) of everything training changes: G's and F's trainable parameters and G's EMA."""
    named = [(f"generator.{n}", p) for n, p in generator.named_parameters()]
    trainable = {id(p) for p in networks.fake_score_parameters()}
    named += [(f"fake_score.{n}", p) for n, p in networks.fake_score.named_parameters() if id(p) in trainable]
    if ema is not None:
        named += [(f"generator_ema.{i}", p) for i, p in enumerate(ema.shadow_params)]
    return named


def register_checkpoint_hooks(accelerator, generator, networks, ema, state):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from .models import is_sharded

    if is_sharded(generator):
        return  # FSDP2: distributed.register_sharded_checkpoint_hooks saves and loads the sharded state

    def role(model):
        unwrapped = accelerator.unwrap_model(model)
        if unwrapped is generator:
            return "generator"
        if unwrapped is networks.fake_score:
            return "fake_score"
        raise RuntimeError(f"unexpected model in checkpoint: {type(unwrapped).__name__}")

    def save_hook(models, weights, output_dir):
        output_dir = Path(output_dir)
        # Before anything is written: a checkpoint with a NaN in it is never published (the run stops, exit 3).
        faults.from_environment().maybe_poison("generator_weights", state.step, generator)
        ensure_finite_weights(
            accelerator,
            trained_tensors(generator, networks, ema),
            f"The weights at step {state.step}",
            output_dir.parent,
        )
        for model in models:
            name = role(model)
            if accelerator.is_main_process:
                if name == "fake_score" and networks.lora:
                    (output_dir / "fake_score_lora").mkdir(parents=True, exist_ok=True)
                    lora = get_peft_model_state_dict(networks.fake_score, adapter_name="fake_score")
                    save_file(
                        {k: v.contiguous() for k, v in lora.items()},
                        str(output_dir / "fake_score_lora" / "adapter_model.safetensors"),
                    )
                else:
                    accelerator.unwrap_model(model).save_pretrained(output_dir / name, safe_serialization=True)
        while weights:
            weights.pop()  # saved above in diffusers format; Accelerate must not write them again
        if ema is not None and accelerator.is_main_process:
            ema.save_pretrained(str(output_dir / "generator_ema"))

    def load_hook(models, input_dir):
        input_dir = Path(input_dir)
        while models:
            model = models.pop()
            name = role(model)
            unwrapped = accelerator.unwrap_model(model)
            if name == "fake_score" and networks.lora:
                lora = load_file(str(input_dir / "fake_score_lora" / "adapter_model.safetensors"))
                set_peft_model_state_dict(unwrapped, lora, adapter_name="fake_score")
            else:
                loaded = type(unwrapped).from_pretrained(input_dir / name)
                unwrapped.load_state_dict(loaded.state_dict())
                del loaded
        if ema is not None:
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(str(input_dir / "generator_ema"), model_cls=type(generator))
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_from_checkpoint(accelerator, args, models, state, path) -> None:
    """Weights, optimisers, schedules, RNG and the step from the checkpoint the main process chose (`path`, or None
    for a fresh run); then this run's optimisation settings, which Accelerate's load_state would otherwise silently
    replace with the checkpoint's: the learning rates always (a resume applies them), Adam's betas, epsilon and
    weight decay and the EMA decay as given (they differ only when --allow_changed_arguments accepted it)."""
    import pickle

    from accelerate.utils import broadcast_object_list

    (chosen,) = broadcast_object_list([None if path is None else str(path)])
    if chosen is None:
        return
    accelerator.print(f"Resuming from {chosen}")
    try:
        accelerator.load_state(chosen)
    except pickle.UnpicklingError:
        # Not torch's message, which advises weights_only=False: wrong advice for a file of unknown origin.
        raise UserInputError(
            f"{chosen} holds objects that are not plain tensors; refusing to unpickle them (they could run code). "
            "Resume from a checkpoint this trainer wrote."
        ) from None
    state.load(Path(chosen))
    apply_optimisation_settings(models, args)


def apply_optimisation_settings(models, args) -> None:
    """Set both optimisers' base learning rates (and the value their schedule gives at the resumed step), betas,
    epsilon and weight decay, and the EMA decay, from `args`."""
    for optimizer, scheduler, learning_rate in (
        (models.generator_optimizer, models.generator_scheduler, args.learning_rate),
        (models.fake_score_optimizer, models.fake_score_scheduler, args.fake_score_learning_rate),
    ):
        inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
        for i, group in enumerate(optimizer.param_groups):
            if inner.base_lrs[i] != learning_rate:
                lambdas = getattr(inner, "lr_lambdas", None)  # diffusers' schedules are all LambdaLR
                factor = lambdas[i](inner.last_epoch) if lambdas else inner.get_last_lr()[i] / inner.base_lrs[i]
                inner.base_lrs[i] = group["initial_lr"] = learning_rate
                group["lr"] = inner._last_lr[i] = learning_rate * factor
            group["betas"] = (args.adam_beta1, args.adam_beta2)
            group["eps"], group["weight_decay"] = args.adam_epsilon, args.adam_weight_decay
    if models.ema is not None:
        models.ema.decay = args.ema_decay


def check_trained_generator(accelerator, models, state, output_dir) -> None:
    """Before the final save: the generator took at least one finite update, and the weights to be published (EMA
    when kept) are finite; NonFiniteTraining (exit 3) otherwise."""
    if state.step - state.skipped["generator"] <= 0:
        raise NonFiniteTraining(
            f"The generator's update was non-finite at all {state.step} steps (each skipped): it never trained, so "
            "no pipeline was saved; see logs/steps.jsonl."
        )
    generator = accelerator.unwrap_model(models.generator)
    faults.from_environment().maybe_poison("final_weights", 0, generator)
    if models.ema is not None:
        named = [(f"generator_ema.{i}", p) for i, p in enumerate(models.ema.shadow_params)]
    else:
        named = [(f"generator.{n}", p) for n, p in generator.named_parameters()]
    ensure_finite_weights(accelerator, named, "The final generator weights", output_dir)


def copy_teacher_text_encoder(args, pipeline_dir: Path) -> None:
    """Put the teacher's T5 (and its model_index entry) into a saved pipeline folder, file for file.

    The trainer may never have held T5 in memory (embedding cache), and re-saving 4.7B parameters would only lose
    the teacher's own precision; copying its files keeps the final pipeline exactly the teacher's text side.
    """
    source = Path(args.pretrained_model_name_or_path)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(
            snapshot_download(
                args.pretrained_model_name_or_path,
                revision=args.revision,
                cache_dir=args.cache_dir,
                allow_patterns=["model_index.json", "text_encoder/*"],
            )
        )
    target = pipeline_dir / "text_encoder"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "text_encoder", target)
    teacher_index = json.loads((source / "model_index.json").read_text())
    index_path = pipeline_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["text_encoder"] = teacher_index["text_encoder"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Validation against the teacher (training.validation): statistics, the side-by-side grid, logs and the collapse check


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 grid."""
    n, h, w, c = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    return (grid * 255).round().clip(0, 255).astype(np.uint8)


def side_by_side_grid(generator_images: np.ndarray, teacher_images: np.ndarray, rows: int, gap: int = 4) -> np.ndarray:
    """One row per prompt: the generator's images, a white gap, then the teacher's from the same noises."""
    left, right = image_grid(generator_images, rows), image_grid(teacher_images, rows)
    white = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, white, right], axis=1)


def decode_images(vae, image_processor, latents: torch.Tensor) -> np.ndarray:
    """x0 latents (B, C, h, w) -> (B, H, W, 3) floats in [0, 1], as the pipeline decodes them."""
    image = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return image_processor.postprocess(image, output_type="np")


def log_validation(
    accelerator, args, one_step, models, validation, validation_log, step, ode_scheduler, teacher_fingerprint=None
):
    """Validate the live generator (EMA weights when kept) against the teacher from the fixed noises: statistics to
    the trackers and `validation_log` (logs/validation.jsonl), the side-by-side grid to the trackers and
    OUTPUT_DIR/validation/, a warning line per prompt below the collapse threshold. The main process computes and
    writes; under FSDP2 the others take part in the sharded networks' calls.

    Returns (the `ValidationResult`, None on other processes; whether the run must stop, the same on every
    process: --validation_collapse_action stop and a prompt below the threshold).
    """
    from .models import is_sharded
    from .validation import ValidationConfig

    config = ValidationConfig.from_namespace(args)
    result = None
    if accelerator.is_main_process or is_sharded(models.generator):
        result = _validate(
            accelerator, args, config, one_step, models, validation, step, ode_scheduler, teacher_fingerprint
        )
    if accelerator.is_main_process:
        _publish_validation(accelerator, args, result, validation_log)
    stop = torch.tensor(
        [int(result is not None and bool(result.collapsed) and config.collapse_action == "stop")],
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        stop = broadcast(stop, from_process=0)
    return result, bool(stop.item())


def _teacher_sample_settings(args, dtype, teacher_fingerprint: str | None) -> dict:
    """What the teacher's validation samples depend on besides prompts, N, K, seed and shape (the cache's key): the
    teacher (its content fingerprint when known, else its name), the text settings, the guidance."""
    return {
        "teacher": teacher_fingerprint or str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "max_sequence_length": args.max_sequence_length,
        "clean_caption": args.clean_caption,
        "dtype": str(dtype),
        "guidance_scale": args.guidance_scale,
    }


@torch.no_grad()
def _validate(accelerator, args, config, one_step, models, validation, step, ode_scheduler, teacher_fingerprint=None):
    """The statistics and images of one validation (`validation` module docstring), on the main process; the
    teacher's samples are prepared on the first call. Other processes (FSDP2 only) run the sharded calls alone:
    the generator's, and the teacher's when it is sharded too; they return None."""
    import time

    from .models import is_sharded
    from .validation import TEACHER_SAMPLES_FILE, added_cond_factory, generator_samples, statistics, teacher_samples

    main = accelerator.is_main_process
    generator, device = accelerator.unwrap_model(models.generator), accelerator.device
    side = generator.config.sample_size
    added = added_cond_factory(generator, side * one_step.vae_scale_factor, device, validation.embeds.dtype)
    teacher_seconds = None
    if main or is_sharded(models.networks.teacher):
        with accelerator.autocast():
            teacher_seconds = validation.prepare(
                config,
                (generator.config.in_channels, side, side),
                args.seed,
                _teacher_sample_settings(args, validation.embeds.dtype, teacher_fingerprint),
                Path(args.output_dir) / TEACHER_SAMPLES_FILE,
                lambda noise: teacher_samples(
                    models.networks,
                    ode_scheduler,
                    noise,
                    validation,
                    args.guidance_scale,
                    config.teacher_steps,
                    added,
                    device,
                ),
                write=main,
            )
    else:
        validation.prepare_noise(config, (generator.config.in_channels, side, side), args.seed)
    tic = time.perf_counter()
    ema = models.ema
    if ema is not None:
        ema.store(generator.parameters())
        ema.copy_to(generator.parameters())
    was_training = generator.training
    generator.eval()
    n = min(args.num_validation_images, config.num_samples)
    try:
        with accelerator.autocast():
            latents = generator_samples(
                generator,
                validation.noise,
                validation,
                one_step.generator_timesteps,
                one_step.scheduler.alphas_cumprod.to(device),
                added,
                device,
                args.seed,
            )
            if not main:
                return None
            images = decode_images(one_step.vae, one_step.image_processor, latents[:, :n].flatten(0, 1))
            if validation.teacher_images is None:
                validation.teacher_images = decode_images(
                    one_step.vae, one_step.image_processor, validation.teacher_latents[:, :n].flatten(0, 1)
                )
    finally:
        generator.train(was_training)
        if ema is not None:
            ema.restore(generator.parameters())
    result = statistics(step, latents, validation.teacher_latents, validation.prompts, config.collapse_threshold)
    result.grid = side_by_side_grid(images, validation.teacher_images, rows=len(validation.prompts))
    result.seconds, result.teacher_seconds = time.perf_counter() - tic, teacher_seconds
    return result


def _publish_validation(accelerator, args, result, validation_log) -> None:
    import sys

    from PIL import Image
    from tqdm.auto import tqdm

    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for name in (f"step-{result.step:07d}.png", "latest.png"):
        Image.fromarray(result.grid).save(folder / name)
    validation_log.write(result.step, result.record())
    accelerator.log(result.scalars(), step=result.step)
    caption = "per prompt: the generator (left) and the teacher (right) from the same noises"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/generator_vs_teacher", result.grid, result.step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation/generator_vs_teacher": wandb.Image(result.grid, caption=caption)}, step=result.step
            )
    for line in result.warnings():
        tqdm.write(line, file=sys.stderr)
