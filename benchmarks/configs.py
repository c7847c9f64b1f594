"""Architectures the benchmarks run, random inputs shaped like the real ones, and the FLOP count of a SIM iteration.

Configs (all randomly initialised, nothing is downloaded):
    tiny     sim_diffusers.testing's fixture (2 layers, width 24, latent 4x8x8, 32-d captions)
    mid      8 layers, 6 heads x 64 (width 384), latent 4x32x32, 512-d captions: a few seconds per iteration on CPU
    xl-512   PixArt-XL-2-512x512: 28 layers, 16 heads x 72 (1152), latent 4x64x64, 4096-d T5 captions
    xl-1024  PixArt-XL-2-1024-MS: as xl-512 with latent 4x128x128, interpolation 2 and micro-conditions

Text conditioning is 120 T5 tokens (PixArt's max_sequence_length) of the config's caption width.

FLOP count (`transformer_forward_flops`): matrix-multiply FLOPs only, 2 per multiply-add, read off the architecture of
diffusers' PixArtTransformer2DModel. With N = (sample_size / patch)^2 image tokens, D = heads x head_dim, T = 120 text
tokens, per block:
    self-attention   q, k, v, out projections 4 * 2ND^2; scores QK^T 2N^2D; weighted values 2N^2D
    cross-attention  q, out 2 * 2ND^2; k, v of the text 2 * 2TD^2; scores 2NTD; values 2NTD
    MLP              D -> 4D -> D: 2 * 2N(4D)D
plus, once per sample: patch embedding (a p x p convolution, 2N(C p^2)D), caption projection (2T(C_text D + D^2)),
timestep embedding (256 -> D -> D) and adaLN-single's D -> 6D, the micro-condition embedders (3 rows of
256 -> D/3 -> D/3), and proj_out (2N D p^2 C_out). Norms, activations, softmax and elementwise ops are not counted
(they are memory-bound, and are not "model FLOPs" in the MFU sense). For PixArt-XL-2 this gives 1.24 TFLOP at 512
(N = 1024) and 6.5 TFLOP at 1024 (N = 4096) per image, the figures in the PixArt paper's lineage; tests check it
against torch.utils.flop_counter on the tiny model.

Backward passes (`sim_iteration_flops`), the usual accounting (Kaplan et al. 2020, "Scaling laws", sec. 2.1; PaLM's
MFU, Chowdhery et al. 2022, app. B): a linear layer's backward is two matrix multiplies of the forward's size, one for
the input gradient and one for the weight gradient. Hence
    trainable network, forward + backward           = 3F
    frozen network backpropagated to its input only = 2F (forward + input gradient; no weight gradient)
    frozen network without gradient (no_grad)        = F
One SIM iteration with batch B (guidance > 1 doubles the teacher's batch, divergences sim / sim_l2 / sid):
    generator forward F + generator backward 2F                     (x0 shared by both updates, computed once)
    fake-score update 3F                                            (2F with LoRA: the frozen base gets no weight grad)
    guided teacher 2 x 2F + frozen fake score 2F                    (both backpropagated to x_t)
    = 12F per sample (11F with a LoRA fake score; 9F for dmd, whose teacher and fake run under no_grad),
plus the teacher-ODE regression targets: 8 guided teacher forwards (16F) for each sample that gets one, one in four
after the warm-up (4F per sample on average: 16F in all). The regression warm-up's iteration has no divergence:
generator 3F + fake-score update 3F + a target for every sample 16F = 22F per sample.
Gradient checkpointing recomputes forwards (+1F per backpropagated network); like MFU we do not count recomputation.
Attention backward with a fused kernel costs more than 2x its forward (it recomputes scores), so 2F for a frozen
network is a lower bound; the landscape's 2.1-2.3x includes that.
"""

from __future__ import annotations

import math

import torch

TEXT_TOKENS = 120  # PixArt-alpha's max_sequence_length
TIMESTEP_PROJ_DIM = 256  # sinusoidal timestep (and micro-condition) features fed to the embedders


def _xl() -> dict:
    """PixArt-XL-2's transformer: the tiny fixture's layout (ada_norm_single, learned sigma, ...) at full width."""
    from sim_diffusers.testing import tiny_transformer_config

    return tiny_transformer_config(
        num_attention_heads=16,
        attention_head_dim=72,
        num_layers=28,
        cross_attention_dim=1152,
        caption_channels=4096,
    )


def transformer_config(name: str) -> dict:
    """PixArtTransformer2DModel keyword arguments of a named benchmark architecture."""
    from sim_diffusers.testing import tiny_transformer_config

    if name == "tiny":
        return tiny_transformer_config()
    if name == "mid":
        return tiny_transformer_config(
            num_attention_heads=6,
            attention_head_dim=64,
            num_layers=8,
            cross_attention_dim=384,
            caption_channels=MID_T5["d_model"],
            sample_size=32,
        )
    if name == "xl-512":
        return dict(_xl(), sample_size=64, interpolation_scale=1, use_additional_conditions=False)
    if name == "xl-1024":
        return dict(_xl(), sample_size=128, interpolation_scale=2, use_additional_conditions=True)
    raise ValueError(f"Unknown config {name!r}; valid: {', '.join(CONFIG_NAMES)}.")


CONFIG_NAMES = ("tiny", "mid", "xl-512", "xl-1024")

# The mid inference pipeline keeps PixArt-XL-2-512's proportions of cost per image (measured with
# torch.utils.flop_counter): T5-XXL encoding 1.1 TFLOP = 0.9 transformer forwards (1.24), SD VAE decode 2.5 TFLOP = 2.0
# forwards. Mid: T5 of 10 layers x 512 wide (d_ff 2048) 9.4 GFLOP = 0.9 mid forwards (10.3); a VAE with the SD VAE's
# layout at 3/16 of its width, 22 GFLOP at 256 px = 2.2 forwards. (taesd's architecture costs 35 GFLOP at 256 px, more
# than the mid VAE: --tiny_vae only saves time at the XL sizes, where it is 0.14 TFLOP against 2.5 at 512 px.)
MID_T5 = dict(d_model=512, d_kv=64, d_ff=2048, num_layers=10, num_heads=6)
XXL_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
SD_VAE_BLOCKS = (128, 256, 512, 512)  # sd-vae-ft-ema, 2 layers per block
MID_VAE_BLOCKS = (24, 48, 96, 96)


def _cast(model, dtype):
    """model.to(dtype) without diffusers 0.42's spurious "modules that should be kept in float32: []" warning."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def build_transformer(name: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """A randomly initialised PixArtTransformer2DModel of a named config, created directly on `device`."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = PixArtTransformer2DModel(**transformer_config(name))
    return _cast(model, dtype).eval()


def random_text_conditioning(
    config: dict, batch_size: int, device="cpu", dtype=torch.float32, seed: int = 0, caption_tokens: int = 32
):
    """T5-shaped random embeddings: caption (B, 120, C) with `caption_tokens` valid tokens, and the empty prompt's
    (B, 120, C) with one valid token (`</s>`), as PixArt pads them. Returns (embeds, mask, neg_embeds, neg_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = config["caption_channels"]
    embeds = torch.randn(batch_size, TEXT_TOKENS, width, generator=g).mul_(0.2)
    negative = torch.randn(1, TEXT_TOKENS, width, generator=g).mul_(0.2).expand(batch_size, -1, -1)
    mask = torch.zeros(batch_size, TEXT_TOKENS, dtype=torch.long)
    mask[:, :caption_tokens] = 1
    neg_mask = torch.zeros(batch_size, TEXT_TOKENS, dtype=torch.long)
    neg_mask[:, :1] = 1
    return (embeds.to(device, dtype), mask.to(device), negative.to(device, dtype).contiguous(), neg_mask.to(device))


# ---------------------------------------------------------------------------------------------------------------------
# Inference components


def build_t5_encoder(shape: dict, vocab_size: int, device="cpu", dtype=torch.float32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        **shape,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = T5EncoderModel(config)
    return model.to(dtype=dtype).eval()


def build_vae(block_out_channels, device="cpu", dtype=torch.float32, seed: int = 0):
    """An AutoencoderKL with the SD VAE's layout (x8, 4 latent channels, scale 0.18215) at the given widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=tuple(block_out_channels),
            norm_num_groups=math.gcd(*block_out_channels, 32),
        )
    return _cast(vae, dtype).eval()


def build_tiny_autoencoder(device="cpu", dtype=torch.float32, seed: int = 0):
    """AutoencoderTiny with its default config, which is taesd's architecture (random weights)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderTiny()
    return _cast(vae, dtype).eval()


def inference_components(name: str, device="cpu", dtype=torch.float32, tiny_vae: bool = False, seed: int = 0) -> dict:
    """The five PixArtAlphaPipeline components of a named config, random weights, on `device` in `dtype`.

    tiny: the test fixture; mid: mid transformer + MID_T5 encoder + MID_VAE_BLOCKS VAE; xl-*: PixArt-XL-2
    + T5-XXL-shaped encoder + SD VAE. The tokenizer is always the fixture's in-memory one (nothing to download); its
    small vocabulary only shrinks the embedding table, not the encoder's cost per token.
    """
    from diffusers import DPMSolverMultistepScheduler

    from sim_diffusers.testing import tiny_pixart_components, tiny_t5_tokenizer

    if name == "tiny":
        components = tiny_pixart_components(seed)
        for key in ("text_encoder", "vae", "transformer"):
            components[key] = _cast(components[key].to(device), dtype)
    else:
        tokenizer = tiny_t5_tokenizer()
        t5_shape, vae_blocks = (MID_T5, MID_VAE_BLOCKS) if name == "mid" else (XXL_T5, SD_VAE_BLOCKS)
        components = dict(
            tokenizer=tokenizer,
            text_encoder=build_t5_encoder(t5_shape, len(tokenizer), device, dtype, seed),
            vae=build_vae(vae_blocks, device, dtype, seed + 1),
            transformer=build_transformer(name, device, dtype, seed + 2),
            scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        )
    if tiny_vae:
        components["vae"] = build_tiny_autoencoder(device, dtype, seed + 1)
    return components


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def transformer_forward_flops(
    config: dict, batch_size: int = 1, text_tokens: int = TEXT_TOKENS, lora_rank: int = 0
) -> int:
    """Matrix-multiply FLOPs of one PixArtTransformer2DModel forward (see the module docstring).

    lora_rank > 0 adds the LoRA adapters on to_q, to_k, to_v, to_out.0 of both attentions (x -> r -> out)."""
    p, c_in = config["patch_size"], config["in_channels"]
    c_out = config.get("out_channels") or c_in
    d = config["num_attention_heads"] * config["attention_head_dim"]
    d_cross = config.get("cross_attention_dim") or d
    n = (config["sample_size"] // p) ** 2
    t = text_tokens
    f = 0
    # Once per sample: patch embedding, timestep/adaLN-single, micro-conditions, caption projection, proj_out.
    f += _linear(n, c_in * p * p, d)
    f += _linear(1, TIMESTEP_PROJ_DIM, d) + _linear(1, d, d) + _linear(1, d, 6 * d)
    if config.get("use_additional_conditions"):
        size = d // 3
        f += 3 * (_linear(1, TIMESTEP_PROJ_DIM, size) + _linear(1, size, size))  # resolution (2 rows) + aspect (1)
    f += _linear(t, config["caption_channels"], d) + _linear(t, d, d)
    f += _linear(n, d, p * p * c_out)
    # Per block.
    block = 0
    block += 4 * _linear(n, d, d) + 2 * (2 * n * n * d)  # self-attention: projections, scores, values
    block += 2 * _linear(n, d, d) + 2 * _linear(t, d_cross, d) + 2 * (2 * n * t * d)  # cross-attention
    block += 2 * _linear(n, d, 4 * d)  # MLP
    if lora_rank > 0:
        # to_q, to_k, to_v, to_out.0 of attn1 (all on image tokens) and attn2 (q, out on image, k, v on text).
        block += 4 * (_linear(n, d, lora_rank) + _linear(n, lora_rank, d))
        block += 2 * (_linear(n, d, lora_rank) + _linear(n, lora_rank, d))
        block += 2 * (_linear(t, d_cross, lora_rank) + _linear(t, lora_rank, d))
    f += config["num_layers"] * block
    return batch_size * f


def sim_iteration_flops(
    config: dict,
    batch_size: int,
    guidance_scale: float = 4.5,
    needs_input_grad: bool = True,
    lora_rank: int = 0,
    regression_samples: float = 0.0,
    regression_steps: int = 8,
    warmup: bool = False,
    generator_steps: int = 1,
) -> dict:
    """FLOPs of one SIM training iteration by pass (model FLOPs, no recomputation); see the module docstring.

    regression_samples: samples of the batch that get a teacher-ODE target (each `regression_steps` guided teacher
    forwards, no backward). warmup: the regression warm-up's iteration, whose generator loss has no divergence (no
    teacher or fake score backpropagated to x_t). generator_steps: K of a K-step generator, whose samples train
    calls 1 .. K uniformly (backward simulation): (K - 1) / 2 calls per sample run before, without gradients.
    """
    fwd = transformer_forward_flops(config, batch_size)
    fake_fwd = transformer_forward_flops(config, batch_size, lora_rank=lora_rank)
    lora_extra = fake_fwd - fwd  # the adapters' own matmuls; they are trainable, so 3x
    guided = 2 if guidance_scale != 1.0 else 1
    teacher_fwd = fwd * guided
    passes = {
        "generator_forward": fwd,
        "generator_backward": 2 * fwd,
        "generator_simulated_calls": fwd * (generator_steps - 1) // 2,
        # trainable: input grads + weight grads. LoRA: the base only needs input grads, the adapters both.
        "fake_score_update": 3 * fwd if lora_rank <= 0 else 2 * fwd + 3 * lora_extra,
    }
    if not warmup:
        passes["teacher_in_generator_loss"] = (2 if needs_input_grad else 1) * teacher_fwd
        passes["fake_score_in_generator_loss"] = (2 if needs_input_grad else 1) * fake_fwd
    passes["regression_targets"] = round(regression_samples * regression_steps * guided * fwd / batch_size)
    passes["total"] = sum(passes.values())
    passes["forward_flops_per_sample"] = fwd // batch_size
    return passes


# Dense bf16 tensor-core peaks (datasheets, no sparsity), TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            if key == "H100" and "PCIE" in device_name.upper():
                return 756.0  # H100 PCIe dense bf16
            return peak
    return None


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def fmt_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"
