#!/usr/bin/env python
"""Latency and throughput of SIMOneStepPipeline against PixArtAlphaPipeline with the same components.

    python benchmarks/inference.py --config mid --batch_sizes 1 --runs 2
    python benchmarks/inference.py --config xl-1024 --precision bf16 --batch_sizes 1 8 --tiny_vae   # on a GPU

Both pipelines share one set of randomly initialised components (benchmarks/configs.py: tokenizer, T5-shaped text
encoder, VAE, transformer); the teacher runs DPMSolverMultistepScheduler with classifier-free guidance (4.5) at each of
--teacher_steps, the one-step pipeline one transformer call. Random weights cost what trained ones cost.

Per pipeline, steps and batch size: end-to-end latency (median of --runs after --warmup calls, device synchronised)
and images/s; the variants of one batch size run interleaved, call by call, and the one-step/teacher latency ratio
is taken per run (median), so that load from other processes hits both sides alike. Timing hooks around the text
encoder, the transformer (all its calls) and the VAE decoder split the latency into T5 encoding, transformer, VAE
decode and the rest (scheduler, latents, post-processing to PIL); on CUDA they synchronise, so the breakdown comes
from separate hooked calls (see `measure`).

Options: --cached_prompt_embeddings (T5 runs once beforehand; the pipelines get prompt_embeds, as a trainer's cache
or a server with fixed prompts would), --tiny_vae (AutoencoderTiny with taesd's architecture, random weights, swapped
in after construction as users do), --precision bf16, --compile (torch.compile of the transformer's and VAE decoder's
forward). Captions are not cleaned (clean_caption=False) and resolution binning is off in both pipelines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import configs

PROMPT = "a photo of a small red cat sitting on a bench in the garden at sunset"
GUIDANCE_SCALE = 4.5  # PixArtAlphaPipeline's default


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=configs.CONFIG_NAMES)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--generator_steps",
        type=int,
        nargs="+",
        default=[1],
        help="K of the SIM pipeline's variants: 1 is the one-step generator, K > 1 a K-step one (its first K calls).",
    )
    parser.add_argument(
        "--teacher_steps",
        type=int,
        nargs="*",
        default=[20, 14],
        help="PixArtAlphaPipeline step counts (empty: one-step pipeline only).",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--cached_prompt_embeddings",
        action="store_true",
        help="Encode the prompts once beforehand and pass prompt_embeds.",
    )
    parser.add_argument(
        "--tiny_vae", action="store_true", help="AutoencoderTiny (taesd's architecture) instead of the KL VAE."
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer's and the VAE decoder's forward."
    )
    parser.add_argument("--output_type", default="pil", choices=["pil", "np", "pt"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch CPU threads (default on CPU: 1, see docs/performance.md)."
    )
    parser.add_argument("--json", default=None, metavar="OUT")
    return parser.parse_args(input_args)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ComponentTimer:
    """Forward hooks that add up the synchronised time spent inside given modules."""

    def __init__(self, device, modules: dict):
        self.device = device
        self.totals = dict.fromkeys(modules, 0.0)
        self.calls = dict.fromkeys(modules, 0)
        self.handles = []
        for name, module_list in modules.items():
            for module in module_list:
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
                self.handles.append(module.register_forward_hook(self._post(name)))
        self._start = {}
        self.enabled = False

    def reset(self):
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def _pre(self, name):
        def hook(module, args):
            if not self.enabled:
                return
            _sync(self.device)
            self._start[id(module)] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            if not self.enabled:
                return
            _sync(self.device)
            self.totals[name] += time.perf_counter() - self._start.pop(id(module))
            self.calls[name] += 1

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def build_pipelines(args, device, dtype):
    from diffusers import DDPMScheduler, PixArtAlphaPipeline

    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.generator import default_generator_timesteps

    components = configs.inference_components(args.config, device, dtype)
    teacher = PixArtAlphaPipeline(**components)
    one_step = SIMOneStepPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        transformer=components["transformer"],
        scheduler=DDPMScheduler.from_config(components["scheduler"].config, clip_sample=False),
        # K-step variants run the first K calls of the largest K's default timesteps (their cost does not depend on
        # the timesteps)
        generator_timesteps=default_generator_timesteps(440, max(args.generator_steps)),
    )
    if args.tiny_vae:
        tiny = configs.build_tiny_autoencoder(device, dtype)
        teacher.vae = tiny  # as users swap in taesd; the pipeline keeps its x8 vae_scale_factor
        one_step.vae = tiny
    if args.compile:
        transformer, vae = components["transformer"], teacher.vae
        transformer.forward = torch.compile(transformer.forward)
        vae.decoder.forward = torch.compile(vae.decoder.forward)
    for pipe in (teacher, one_step):
        pipe.set_progress_bar_config(disable=True)
    return teacher, one_step


def _call_kwargs(args, pipe, batch_size, steps, cache, side, generator_steps=1):
    kwargs = dict(
        height=side, width=side, output_type=args.output_type, use_resolution_binning=False, clean_caption=False
    )
    if steps is not None:
        kwargs.update(num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE)
    else:
        kwargs.update(num_inference_steps=generator_steps)
    if cache is None:
        kwargs["prompt"] = [PROMPT] * batch_size
    else:
        kwargs.update(
            prompt_embeds=cache["prompt_embeds"][:batch_size],
            prompt_attention_mask=cache["prompt_attention_mask"][:batch_size],
        )
        if steps is not None:
            kwargs.update(
                negative_prompt=None,
                negative_prompt_embeds=cache["negative_prompt_embeds"][:batch_size],
                negative_prompt_attention_mask=cache["negative_prompt_attention_mask"][:batch_size],
            )
    return kwargs


def _timed_call(pipe, kwargs, device, timer=None):
    generator = torch.Generator(device="cpu").manual_seed(0)
    if timer is not None:
        timer.reset()
    _sync(device)
    t0 = time.perf_counter()
    pipe(**kwargs, generator=generator)
    _sync(device)
    return time.perf_counter() - t0


def measure(args, variants, device, timer) -> list[dict]:
    """Time every variant (pipeline, steps) of one batch size, interleaved run by run (so that load from other
    processes hits all variants alike). On CPU every timed call carries the component hooks (synchronising is a no-op
    there); on CUDA the hooks' synchronisations would expose kernel-launch time, so latency comes from plain calls and
    the breakdown from --runs extra hooked calls."""
    hooked_timed = device.type != "cuda"
    for _ in range(args.warmup):
        for v in variants:
            _timed_call(v["pipe"], v["kwargs"], device)
    latencies = {i: [] for i in range(len(variants))}
    breakdowns = {i: [] for i in range(len(variants))}
    for _ in range(args.runs):
        for i, v in enumerate(variants):
            timer.enabled = hooked_timed
            latencies[i].append(_timed_call(v["pipe"], v["kwargs"], device, timer))
            if hooked_timed:
                breakdowns[i].append((latencies[i][-1], dict(timer.totals), dict(timer.calls)))
    if not hooked_timed:
        for _ in range(args.runs):
            for i, v in enumerate(variants):
                timer.enabled = True
                hooked = _timed_call(v["pipe"], v["kwargs"], device, timer)
                breakdowns[i].append((hooked, dict(timer.totals), dict(timer.calls)))
    timer.enabled = False
    rows = []
    for i, v in enumerate(variants):
        parts = {k: statistics.median(b[1][k] for b in breakdowns[i]) * 1e3 for k in timer.totals}
        parts["other"] = statistics.median(b[0] - sum(b[1].values()) for b in breakdowns[i]) * 1e3
        rows.append(
            {
                "latency_ms": statistics.median(latencies[i]) * 1e3,
                "latency_ms_runs": [t * 1e3 for t in latencies[i]],
                "breakdown_ms": parts,
                "calls": breakdowns[i][-1][2],
                "hooked_latency_ms": statistics.median(b[0] for b in breakdowns[i]) * 1e3,
            }
        )
    return rows


def main(args) -> dict:
    from benchmarks.train_step import device_name, set_cpu_threads

    set_cpu_threads(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    teacher, one_step = build_pipelines(args, device, dtype)
    build_s = time.perf_counter() - t0
    config = configs.transformer_config(args.config)
    side = config["sample_size"] * 8
    modules = {
        "text_encoder": [teacher.text_encoder],
        "transformer": [teacher.transformer],
        "vae_decode": [
            m for m in (teacher.vae.decoder, getattr(teacher.vae, "post_quant_conv", None)) if m is not None
        ],
    }

    cache = None
    if args.cached_prompt_embeddings:
        with torch.no_grad():
            pe, pm, ne, nm = teacher.encode_prompt(
                [PROMPT] * max(args.batch_sizes), do_classifier_free_guidance=True, device=device
            )
        cache = dict(
            prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne, negative_prompt_attention_mask=nm
        )

    forward = configs.transformer_forward_flops(config)
    timer = ComponentTimer(device, modules)
    rows = []
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            variants = [
                dict(name="sim_one_step" if k == 1 else f"sim_{k}_steps", pipe=one_step, steps=None, k=k)
                for k in args.generator_steps
            ]
            variants += [dict(name="pixart_alpha", pipe=teacher, steps=s, k=None) for s in args.teacher_steps]
            for v in variants:
                v["kwargs"] = _call_kwargs(args, v["pipe"], batch_size, v["steps"], cache, side, v["k"] or 1)
            for v, r in zip(variants, measure(args, variants, device, timer)):
                steps = v["steps"]
                r.update(
                    pipeline=v["name"],
                    steps=steps or v["k"],
                    guidance_scale=None if steps is None else GUIDANCE_SCALE,
                    batch_size=batch_size,
                    images_per_s=batch_size / (r["latency_ms"] / 1e3),
                    transformer_flops=(steps or v["k"]) * forward * batch_size * (1 if steps is None else 2),
                )
                rows.append(r)
                print(
                    f"{v['name']:13s} steps {r['steps']:3d} batch {batch_size:2d}: {r['latency_ms']:9.1f} ms, "
                    f"{r['images_per_s']:7.2f} img/s | "
                    + ", ".join(f"{k} {x:.1f}" for k, x in r["breakdown_ms"].items()),
                    flush=True,
                )
    timer.remove()

    # One-step vs guided-teacher latency ratios at the same batch size.
    ratios = {}
    for r in rows:
        if r["pipeline"] != "sim_one_step":
            base = next(x for x in rows if x["pipeline"] == "sim_one_step" and x["batch_size"] == r["batch_size"])
            name = f"pixart_{r['steps']}_steps" if r["pipeline"] == "pixart_alpha" else r["pipeline"]
            ratios[f"{name}_over_one_step_batch_{r['batch_size']}"] = {
                # per run (the two calls ran back to back), median over runs
                "end_to_end": statistics.median(a / b for a, b in zip(r["latency_ms_runs"], base["latency_ms_runs"])),
                "transformer_only": r["breakdown_ms"]["transformer"] / base["breakdown_ms"]["transformer"],
            }
    result = {
        "args": vars(args),
        "device": device_name(device),
        "torch": torch.__version__,
        "config": args.config,
        "image_side_px": side,
        "build_s": build_s,
        "rows": rows,
        "ratios": ratios,
        "memory": ({"peak_allocated_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}),
    }
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_report(r: dict) -> None:
    a = r["args"]
    opts = [a["precision"]] + [k for k in ("cached_prompt_embeddings", "tiny_vae", "compile") if a[k]]
    print(f"\n## Inference: {r['config']} ({r['image_side_px']} px), {', '.join(opts)}; {r['device']}")
    print("| pipeline | steps | batch | latency ms | img/s | T5 ms | transformer ms | VAE decode ms | other ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        b = x["breakdown_ms"]
        print(
            f"| {x['pipeline']} | {x['steps']} | {x['batch_size']} | {x['latency_ms']:.1f} | "
            f"{x['images_per_s']:.2f} | "
            f"{b['text_encoder']:.1f} | {b['transformer']:.1f} | {b['vae_decode']:.1f} | {b['other']:.1f} |"
        )
    for k, v in r["ratios"].items():
        print(f"{k}: end-to-end {v['end_to_end']:.1f}x, transformer only {v['transformer_only']:.1f}x")


if __name__ == "__main__":
    main(parse_args())
