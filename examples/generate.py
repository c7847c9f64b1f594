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


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        path = Path(args.prompt_file)
        if not path.is_file():
            parser.error(f"--prompt_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        parser.error("give at least one prompt, as arguments or with --prompt_file")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    args.prompt_list = prompts
    return args


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "image"


def main(args) -> list[Path]:
    import torch
    from tqdm.auto import tqdm

    from sim_diffusers import SIMOneStepPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    pipe = SIMOneStepPipeline.from_pretrained(
        args.model, dtype=getattr(torch, DTYPES[dtype_name]), revision=args.revision
    ).to(device)
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
