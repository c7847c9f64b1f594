"""Pieces of the training script that are not the algorithm: state, optimisers, text, checkpoint hooks, validation.

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

from .checkpointing import COMPLETE_MARKER
from .iteration import MicroBatch
from .step import Conditioning
from .text_embeddings import OnlineTextEncoder, TextEmbeddingCache, build_text_embedding_cache

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a checkpoint must restore beyond weights, optimisers and RNG: the step (= caption-stream position) and
    the non-finite-step counters. Its JSON file is also the marker of a complete checkpoint."""

    step: int = 0
    skipped: dict = field(default_factory=lambda: {"generator": 0, "fake_score": 0})
    consecutive_bad: int = 0

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
        data = {"step": self.step, "skipped": self.skipped, "consecutive_bad": self.consecutive_bad}
        (Path(directory) / COMPLETE_MARKER).write_text(json.dumps(data, indent=2))

    def load(self, directory: Path) -> None:
        data = json.loads((Path(directory) / COMPLETE_MARKER).read_text())
        self.step, self.skipped, self.consecutive_bad = data["step"], data["skipped"], data["consecutive_bad"]


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


def _cache_settings(args, dtype) -> dict:
    return {
        "teacher": str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "max_sequence_length": args.max_sequence_length,
        "clean_caption": args.clean_caption,
        "dtype": str(dtype),
    }


def needs_text_encoder(args) -> bool:
    """T5 must be loaded unless a complete cache already holds the captions and the validation prompts."""
    if args.text_embedding_cache is None:
        return True
    cache_dir = Path(args.text_embedding_cache)
    if not (cache_dir / "index.json").is_file():
        return True
    return bool(args.validation_prompts) and not TextEmbeddingCache.has_extra(cache_dir, args.validation_prompts)


def load_text_conditioning(args, accelerator, teacher_pipe, captions, dtype):
    """A callable captions -> (embeds, mask) with `.negative()` and `.extra(prompts)`; builds the cache if asked."""
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
        _cache_settings(args, dtype),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        progress=lambda n: bar.update(n * accelerator.num_processes),
        extra_prompts=args.validation_prompts,
    )
    bar.close()
    return TextEmbeddingCache(args.text_embedding_cache, device, dtype)


def validation_embeddings(args, text):
    """Validation prompt embeddings, computed once, so validation never needs T5."""
    if not args.validation_prompts:
        return None
    if isinstance(text, TextEmbeddingCache):
        return text.extra(args.validation_prompts)
    return text(args.validation_prompts)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint hooks: G, F and EMA in diffusers format (safetensors), not as Accelerate's anonymous model files.


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
# Validation images


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 grid."""
    n, h, w, c = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    return (grid * 255).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def log_validation(accelerator, args, one_step, generator, ema, validation, step, weight_dtype):
    """Images of the fixed validation prompts and seeds from the live generator (EMA weights when kept). A sharded
    (FSDP2) generator runs on every process, each holding a shard; the main process writes the images."""
    from .models import is_sharded

    if validation is None or not (accelerator.is_main_process or is_sharded(generator)):
        return None
    from PIL import Image

    from ..pipelines import SIMOneStepPipeline

    if ema is not None:
        ema.store(generator.parameters())
        ema.copy_to(generator.parameters())
    was_training = generator.training
    generator.eval()
    try:
        pipe = SIMOneStepPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=one_step.vae,
            transformer=generator,
            scheduler=one_step.scheduler,
            conditioning_timestep=one_step.conditioning_timestep,
        )
        pipe.set_progress_bar_config(disable=True)
        embeds, mask = validation
        n = args.num_validation_images
        seeds = [torch.Generator().manual_seed(i) for _ in range(len(args.validation_prompts)) for i in range(n)]
        with accelerator.autocast():
            images = pipe(
                prompt_embeds=embeds.repeat_interleave(n, 0),
                prompt_attention_mask=mask.repeat_interleave(n, 0),
                generator=seeds,
                output_type="np",
                use_resolution_binning=False,
            ).images
    finally:
        generator.train(was_training)
        if ema is not None:
            ema.restore(generator.parameters())
    if not accelerator.is_main_process:
        return images
    grid = image_grid(images, rows=len(args.validation_prompts))
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(folder / f"step-{step:07d}.png")
    Image.fromarray(grid).save(folder / "latest.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([(im * 255).astype(np.uint8) for im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(im, caption=p) for im, p in zip(images, np.repeat(args.validation_prompts, n))
                    ]
                },
                step=step,
            )
    return images
