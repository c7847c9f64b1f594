#!/usr/bin/env python
"""Compare a SIM one-step model with its PixArt-alpha or PixArt-Σ teacher the way the SIM paper does, in one command.

    python examples/evaluate.py \
        --model SIM=path/to/sim-model \
        --model PixArt-alpha=PixArt-alpha/PixArt-XL-2-512x512:30:4.5 \
        --num_samples 1000 --batch_size 16 \
        --metrics aesthetic,imagereward,pickscore,clip_score \
        --output_dir eval/sim-vs-pixart

A model is `[LABEL=]PATH[:STEPS[:GUIDANCE]]`: a Hub id or folder; a folder whose model_index.json names
`SIMOneStepPipeline` is sampled in one step, a teacher with its own `PixArtAlphaPipeline` or `PixArtSigmaPipeline`
(30 steps and guidance 4.5 unless given). Sample i uses caption i (cycling through the caption file) and seed
`--seed + i` for every model, so the grid compares the same prompt and noise. Each metric's weights come from a Hub
id or local path (see --help and docs/evaluation.md). Writes images/, results.json and report.html to --output_dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import posixpath
import sys
import time
from datetime import UTC, datetime

import torch
from PIL import Image
from tqdm.auto import tqdm

from sim_diffusers.evaluation import aesthetic, clip_score, get_scorer, imagereward, pickscore, scorer_class, summarize
from sim_diffusers.evaluation.generation import (
    ModelSpec,
    default_captions_file,
    generate,
    load_pipeline,
    read_captions,
    slugify,
)
from sim_diffusers.evaluation.report import write_report

DEFAULT_METRICS = "aesthetic,imagereward,pickscore,clip_score"
# metric -> (argument with its weights, {scorer option: argument})
METRIC_ARGUMENTS = {
    "aesthetic": ("aesthetic_head", {"clip_model": "aesthetic_clip"}),
    "imagereward": ("imagereward_model", {"tokenizer": "imagereward_tokenizer"}),
    "pickscore": ("pickscore_model", {"processor": "pickscore_processor"}),
    "clip_score": ("clip_score_model", {"processor": "clip_score_processor"}),
    "fid": ("fid_model", {"reference": "fid_reference"}),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`error: ...`), exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(input_args=None):
    parser = _OneLineErrorParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )

    models = parser.add_argument_group("models and sampling")
    models.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="[LABEL=]PATH[:STEPS[:CFG]]",
        help="A model to compare; repeat for each. Hub id or folder.",
    )
    models.add_argument("--captions", default=default_captions_file(), help="Caption file, one per line.")
    models.add_argument("--num_samples", type=int, default=None, help="Images per model (default: one per caption).")
    models.add_argument("--seed", type=int, default=0, help="Sample i uses seed + i.")
    models.add_argument("--batch_size", type=int, default=8, help="Images per pipeline and scorer call.")
    models.add_argument("--resolution", type=int, default=None, help="Square size in pixels (default: the model's).")
    models.add_argument(
        "--no_resolution_binning",
        dest="resolution_binning",
        action="store_false",
        help="Sample at the exact resolution; needed for models not trained at 256/512/1024 px.",
    )

    metrics = parser.add_argument_group("metrics and their weights (Hub id or local path)")
    metrics.add_argument(
        "--metrics",
        default=DEFAULT_METRICS,
        help="Comma-separated, from: aesthetic, imagereward, pickscore, clip_score, fid.",
    )
    metrics.add_argument(
        "--aesthetic_head",
        default=aesthetic.DEFAULT_HEAD,
        help="LAION aesthetic v2 head: .safetensors or upstream .pth (file, folder or 'repo:file').",
    )
    metrics.add_argument("--aesthetic_clip", default=aesthetic.DEFAULT_CLIP, help="CLIP ViT-L/14 for the head.")
    metrics.add_argument(
        "--imagereward_model",
        default=imagereward.DEFAULT_MODEL,
        help="Folder or Hub repo with upstream's ImageReward.pt and med_config.json.",
    )
    metrics.add_argument("--imagereward_tokenizer", default=imagereward.DEFAULT_TOKENIZER, help="bert-base-uncased.")
    metrics.add_argument("--pickscore_model", default=pickscore.DEFAULT_MODEL, help="PickScore CLIP-H.")
    metrics.add_argument("--pickscore_processor", default=pickscore.DEFAULT_PROCESSOR, help="Its CLIP-H processor.")
    metrics.add_argument("--clip_score_model", default=clip_score.DEFAULT_MODEL, help="A transformers CLIPModel.")
    metrics.add_argument("--clip_score_processor", default=None, help="Default: the model's own.")
    metrics.add_argument(
        "--fid_model",
        default=None,
        help="FID features: TorchScript file (e.g. inception-2015-12-05.pt) or a CLIP model.",
    )
    metrics.add_argument(
        "--fid_reference",
        default=None,
        help="FID reference: a folder of images, or statistics (.safetensors with mu, sigma).",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="eval_results", help="Gets images/, results.json, report.html.")
    run.add_argument("--grid_size", type=int, default=12, help="Prompts shown in the report's image grid.")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    run.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Of pipelines and scorers (default: float16 on CUDA, float32 on CPU).",
    )
    run.add_argument("--title", default="SIM one-step vs teacher", help="Heading of the report.")
    run.add_argument("--dry_run", action="store_true", help="Print the resolved configuration and exit.")

    args = parser.parse_args(input_args)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    for name in args.metrics:
        try:
            scorer_class(name)  # fails early on an unknown name
        except ValueError as err:
            parser.error(str(err))
    if "fid" in args.metrics and (args.fid_model is None or args.fid_reference is None):
        parser.error("--metrics fid needs --fid_model and --fid_reference.")
    if args.batch_size < 1 or (args.num_samples is not None and args.num_samples < 1):
        parser.error("--batch_size and --num_samples must be positive.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file; give a folder.")
    try:
        read_captions(args.captions)  # readable now, not after the models have loaded
    except FileNotFoundError:
        parser.error(f"--captions {args.captions} does not exist.")
    except UnicodeDecodeError as err:
        parser.error(f"--captions {args.captions} is not UTF-8 text (byte {err.start}); save it as UTF-8.")
    except (OSError, ValueError) as err:
        parser.error(f"--captions {args.captions}: {err}")
    for text in args.models:
        check_model_path(text, parser)
    return args


def check_model_path(text: str, parser) -> None:
    """A model spec must parse, and name a pipeline folder or something that can be a Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        spec = ModelSpec.parse(text)
    except ValueError as err:
        parser.error(str(err))
    if os.path.exists(spec.path):
        if not os.path.isfile(os.path.join(spec.path, "model_index.json")):
            parser.error(f"--model {text}: {spec.path} is not a pipeline folder (no model_index.json).")
        return
    try:
        validate_repo_id(spec.path)
    except HFValidationError:
        parser.error(f"--model {text}: {spec.path} does not exist (neither a local folder nor a Hub repo id).")


def resolve_models(args) -> list[ModelSpec]:
    """Every model's pipeline class and sampling settings, or one `error:` line (exit 2) for a model that cannot be
    reached (an unknown Hub id, no network) or sampled that way."""
    specs = []
    for text in args.models:
        try:
            specs.append(ModelSpec.parse(text).resolve())
        except Exception as err:  # noqa: BLE001 - one line, not a traceback, whatever the reason
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"error: --model {text}: {type(err).__name__}: {first_line[:200]}", file=sys.stderr)
            raise SystemExit(2) from None
    return specs


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def generate_images(spec: ModelSpec, samples: list[dict], args, image_dir: str) -> tuple[list[str], float]:
    """Sample every prompt with `spec`, save PNGs; return their paths (relative to output_dir) and s / image."""
    pipe = load_pipeline(spec, args.device, DTYPES[args.dtype])
    os.makedirs(os.path.join(args.output_dir, image_dir), exist_ok=True)
    paths, timings = [], []
    for batch in tqdm(list(batches(samples, args.batch_size)), desc=f"generate {spec.label}", unit="batch"):
        synchronize(args.device)
        start = time.perf_counter()
        images = generate(
            pipe,
            spec,
            [s["prompt"] for s in batch],
            [s["seed"] for s in batch],
            height=args.resolution,
            width=args.resolution,
            resolution_binning=args.resolution_binning,
        )
        synchronize(args.device)
        timings.append(((time.perf_counter() - start), len(batch)))
        for sample, image in zip(batch, images):
            path = posixpath.join(image_dir, f"{sample['index']:05d}.png")  # also a URL in report.html
            image.save(os.path.join(args.output_dir, path))
            paths.append(path)
    del pipe
    free_memory()
    timed = timings[1:] or timings  # the first batch pays for warm-up
    return paths, sum(t for t, _ in timed) / sum(n for _, n in timed)


def load_images(output_dir: str, paths: list[str]) -> list[Image.Image]:
    return [Image.open(os.path.join(output_dir, path)).convert("RGB") for path in paths]


def load_scorer(name: str, weights_argument: str, options: dict, args):
    """The metric's scorer; a weights file that holds more than tensors is refused in one `error:` line (exit 2),
    without torch's advice to unpickle it anyway, which is wrong for a file of unknown origin."""
    import pickle

    weights = getattr(args, weights_argument)
    try:
        return get_scorer(name, weights, args.device, DTYPES[args.dtype], **options)
    except pickle.UnpicklingError:
        print(
            f"error: --{weights_argument} {weights} holds objects that are not plain tensors; refusing to unpickle it "
            "(it could run code). Use its .safetensors, or the file its authors publish.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def score_models(name: str, models: list[dict], samples: list[dict], args) -> None:
    """Load one scorer, score every model's images, store per-image scores and the summary in `models`."""
    weights_argument, option_arguments = METRIC_ARGUMENTS[name]
    options = {option: getattr(args, argument) for option, argument in option_arguments.items()}
    options = {option: value for option, value in options.items() if value is not None}
    scorer = load_scorer(name, weights_argument, options, args)
    if not scorer.per_image and os.path.isdir(args.fid_reference):  # save the reference statistics for reuse
        scorer.save_reference_stats(os.path.join(args.output_dir, "fid_reference_stats.safetensors"))
    prompts = [s["prompt"] for s in samples]
    for model in models:
        scores = []
        pairs = list(zip(batches(model["images"], args.batch_size), batches(prompts, args.batch_size)))
        for paths, batch_prompts in tqdm(pairs, desc=f"{name} {model['label']}", unit="batch"):
            images = load_images(args.output_dir, paths)
            if scorer.per_image:
                scores.append(scorer(images, batch_prompts))
            else:
                scorer.update(images)
        if scorer.per_image:
            scores = torch.cat(scores)
            model["scores"][name] = scores.tolist()
            model["summary"][name] = summarize(scores)
        else:
            model["summary"][name] = {
                "value": scorer.compute(),
                "n": len(model["images"]),
                "reference_n": scorer.num_reference,
            }
            scorer.reset()
    del scorer
    free_memory()


def main(args):
    # 1. Resolve the comparison: samples (caption, seed), models, metrics
    captions = read_captions(args.captions)
    num_samples = args.num_samples or len(captions)
    samples = [{"index": i, "prompt": captions[i % len(captions)], "seed": args.seed + i} for i in range(num_samples)]
    specs = resolve_models(args)
    metrics = []
    for name in args.metrics:
        cls = scorer_class(name)
        weights_argument, option_arguments = METRIC_ARGUMENTS[name]
        metrics.append(
            {
                "name": name,
                "display_name": cls.display_name,
                "short_name": cls.short_name,
                "higher_is_better": cls.higher_is_better,
                "per_image": cls.per_image,
                "note": cls.note,
                "weights": getattr(args, weights_argument),
                **{option: getattr(args, argument) for option, argument in option_arguments.items()},
            }
        )
    config = {k: v for k, v in vars(args).items() if k != "models"}
    if args.dry_run:
        print(json.dumps({"config": config, "models": [s.to_dict() for s in specs], "metrics": metrics}, indent=2))
        return None
    os.makedirs(args.output_dir, exist_ok=True)

    # 2. Generate: one pipeline in memory at a time, images saved as PNG
    models = []
    for i, spec in enumerate(specs):
        image_dir = posixpath.join("images", f"{i}-{slugify(spec.label)}")
        paths, seconds_per_image = generate_images(spec, samples, args, image_dir)
        models.append(
            {**spec.to_dict(), "images": paths, "seconds_per_image": seconds_per_image, "summary": {}, "scores": {}}
        )

    # 3. Score: one scorer in memory at a time, over every model's images
    for metric in metrics:
        score_models(metric["name"], models, samples, args)

    # 4. Write results.json and report.html
    results = {
        "title": args.title,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(sys.argv),
        "config": config,
        "metrics": metrics,
        "samples": samples,
        "models": models,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    write_report(results, os.path.join(args.output_dir, "report.html"))
    for model in models:
        summary = ", ".join(
            f"{name} {s['value']:.4g}" if "value" in s else f"{name} {s['mean']:.4g} \u00b1 {s['sem'] or 0:.2g}"
            for name, s in model["summary"].items()
        )
        print(f"{model['label']} (steps={model['steps']}): {summary}")
    print(f"Report: {os.path.join(args.output_dir, 'report.html')}")
    return results


if __name__ == "__main__":
    main(parse_args())
