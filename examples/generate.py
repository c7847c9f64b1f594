#!/usr/bin/env python
"""Generate PNG files from prompts with a one-step SIM model.

    python examples/generate.py --model path/or/hub-id "a red fox in the snow" "a castle at sunset" --output_dir out
    python examples/generate.py --model path/or/hub-id --prompt_file prompts.txt --batch_size 8 --dtype bf16

Each image is written as `{index:05d}-{slug}.png`; seed `--seed + index` makes every image reproducible on its own.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`error: ...`), exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def read_prompt_file(path: Path, parser) -> list[str]:
    if not path.is_file():
        parser.error(
            f"--prompt_file {path} does not exist" if not path.exists() else f"--prompt_file {path} is not a file"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        parser.error(f"--prompt_file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8")
    except OSError as err:
        parser.error(f"--prompt_file {path} cannot be read ({err.strerror or err})")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_model(model: str, parser) -> None:
    """A local folder must be a pipeline; anything else must at least be a valid Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            parser.error(f"--model {model} is not a pipeline folder (no model_index.json)")
        return
    try:
        validate_repo_id(model)
    except HFValidationError:
        parser.error(f"--model {model} does not exist (neither a local folder nor a Hub repo id)")


def parse_args(input_args=None):
    parser = _OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="Prompts to generate (or use --prompt_file).")
    parser.add_argument("--model", required=True, help="Folder or Hub id of a SIMOneStepPipeline.")
    parser.add_argument("--prompt_file", help="Text file with one prompt per line.")
    parser.add_argument("--output_dir", default="generated", help="Where to write the PNG files.")
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--height", type=int, default=None, help="Image height (default: the model's).")
    parser.add_argument("--width", type=int, default=None, help="Image width (default: the model's).")
    parser.add_argument("--batch_size", type=int, default=4, help="Prompts per pipeline call.")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps... (default: cuda if available).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: bf16 on CUDA, fp32 else.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument("--no_resolution_binning", action="store_true", help="Generate at exactly --height x --width.")
    args = parser.parse_args(input_args)
    prompts = list(args.prompts)
    if args.prompt_file:
        prompts += read_prompt_file(Path(args.prompt_file), parser)
    if not prompts:
        parser.error("give at least one prompt, as arguments or with --prompt_file")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file; give a folder")
    check_model(args.model, parser)
    args.prompt_list = prompts
    return args


def load_pipeline(args, dtype):
    """The pipeline, or one `error:` line (exit 2) when it cannot be loaded (a Hub id that does not exist, no
    network, an incomplete folder)."""
    from sim_diffusers import SIMOneStepPipeline

    try:
        return SIMOneStepPipeline.from_pretrained(args.model, dtype=dtype, revision=args.revision)
    except Exception as err:  # noqa: BLE001 - whatever the reason, the user gets one line, not a traceback
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"error: --model {args.model} cannot be loaded ({type(err).__name__}: {first_line[:200]})", file=sys.stderr
        )
        raise SystemExit(2) from None


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "image"


def main(args) -> list[Path]:
    import torch
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    pipe = load_pipeline(args, getattr(torch, DTYPES[dtype_name])).to(device)
    pipe.set_progress_bar_config(disable=True)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompts, written = args.prompt_list, []
    with tqdm(total=len(prompts), desc="Generating", unit="img", disable=len(prompts) < 2) as progress:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(args.seed + start + i) for i in range(len(batch))]
            images = pipe(
                batch,
                generator=generators,
                height=args.height,
                width=args.width,
                use_resolution_binning=not args.no_resolution_binning,
            ).images
            for i, (prompt, image) in enumerate(zip(batch, images)):
                path = output_dir / f"{start + i:05d}-{slug(prompt)}.png"
                image.save(path)
                written.append(path)
            progress.update(len(batch))
    print(f"Wrote {len(written)} image(s) to {output_dir}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) else 1)
