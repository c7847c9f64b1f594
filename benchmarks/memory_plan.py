#!/usr/bin/env python
"""The memory plan's table of PixArt-XL-2 runs (docs/performance.md): per-GPU peak for DDP and FSDP2, from the
architecture alone (sim_diffusers.training.memory; nothing is built but meta-device modules).

    python -m benchmarks.memory_plan                       # XL-512 and XL-1024 at 8 GPUs, markdown
    python -m benchmarks.memory_plan --world_size 16 --gpu_memory_gb 141

Every row: bf16, EMA on, T5 cached (--text_embedding_cache), full-copy fake score unless marked, guidance 4.5, the
regression term on; T5-XXL's and the SD VAE's sizes from their architectures.
"""

from __future__ import annotations

import argparse

from benchmarks import configs
from sim_diffusers.training.memory import GIB, Architecture, RunSpec, memory_plan, module_parameters

T5_XXL = dict(configs.XXL_T5, vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
SD_VAE = dict(
    block_out_channels=list(configs.SD_VAE_BLOCKS),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
ROWS = [  # (config, batch per GPU, gradient checkpointing, LoRA rank)
    ("xl-512", 4, False, 0),
    ("xl-512", 8, False, 0),
    ("xl-512", 8, True, 0),
    ("xl-512", 8, False, 64),
    ("xl-1024", 1, False, 0),
    ("xl-1024", 2, False, 0),
    ("xl-1024", 4, False, 0),
    ("xl-1024", 4, True, 0),
    ("xl-1024", 8, True, 0),
]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_size", type=int, default=8, help="GPUs in the run.")
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="The card (fits: peak <= 90% of it).")
    return parser.parse_args(input_args)


def table(world_size: int, gpu_memory_gb: float) -> str:
    t5, vae = module_parameters(T5_XXL, "text_encoder"), module_parameters(SD_VAE, "vae")
    lines = [
        "| config | batch/GPU | checkpointing | fake score | DDP peak (static) | FSDP2 peak (static) | "
        f"fits {gpu_memory_gb:g} GB (DDP/FSDP2) |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for name, batch, ckpt, lora in ROWS:
        arch = Architecture.from_config(configs.transformer_config(name))
        plans = {}
        for sharding in ("none", "fsdp"):
            spec = RunSpec(
                arch,
                batch_size=batch,
                gradient_checkpointing=ckpt,
                fake_score_lora_rank=lora,
                text_encoder_parameters=t5,
                text_encoder_resident=False,
                vae_parameters=vae,
                use_ema=True,
                world_size=world_size,
                sharding=sharding,
            )
            plans[sharding] = memory_plan(spec)
        cells = [f"{p.peak / GIB:.1f} GiB ({sum(p.static.values()) / GIB:.1f})" for p in plans.values()]
        fits = "/".join("yes" if p.fits(gpu_memory_gb) else "no" for p in plans.values())
        lines.append(
            f"| {name} | {batch} | {'on' if ckpt else 'off'} | {f'LoRA r={lora}' if lora else 'full copy'} | "
            f"{cells[0]} | {cells[1]} | {fits} |"
        )
    return "\n".join(lines)


def main(args) -> str:
    text = table(args.world_size, args.gpu_memory_gb)
    print(text)
    return text


if __name__ == "__main__":
    main(parse_args())
