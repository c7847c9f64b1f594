"""The memory plan of a SIM run: per-GPU bytes by component, from the architecture alone (no GPU, no weights).

    plan = memory_plan(RunSpec(architecture=Architecture.from_config(transformer_config), batch_size=4, ...))
    print(format_plan(plan, gpu_memory_gb=80))

Static memory is counted exactly: parameters, gradients, optimiser states and EMA from the parameter counts (read off a
module built on the meta device from the config, so they are the module's own counts), divided by the world size for
what FSDP2 shards. Activations are what autograd holds, computed by running the PixArt forward symbolically
(`_Trace`): every op the diffusers PixArtTransformer2DModel runs, with the tensors autograd saves for its backward
under the rules of that op (a linear layer keeps its input when its weight is trained, its weight when its input needs
a gradient; layer norm its input and statistics; attention q, k, v, its output and log-sum-exp; ...), in the dtypes
autocast gives them on the device (bf16 matmuls, layer norm in fp32 on CUDA; casts of fp32 weights, cached for
trained weights), a tensor kept by several ops counted once. Activation checkpointing keeps a block's inputs
instead of its internals.

The peak of an iteration is the largest of three moments (`iteration.SIMIteration`):
  generator step    G's graph (x0 is shared with the fake-score update) + the guided teacher's (2B samples) and the
                    frozen F's, both backpropagated to x_t, just before the generator's backward;
  generator backward  G's graph + G's gradients (the teacher's and F's graphs are freed by then);
  fake-score update   G's graph + F's own graph + F's gradients.
What is not counted: the CUDA context and NCCL buffers, the caching allocator's slack, transient workspaces of
kernels, the teacher's no-grad forwards for the regression targets (one layer's worth at a time); the plan asks that
the peak stay under 90% of the card.
Validated on CPU against the exact counts of `benchmarks.train_step` (tests/test_memory_plan.py) and on a GPU against
torch.cuda.max_memory_allocated (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

FP32, BF16 = 4, 2  # bytes per element
GIB = 2**30  # --gpu_memory_gb is read as the card is sold (80 for an 80 GB H100), which is GiB
USABLE_FRACTION = 0.9  # of the card: the rest for the CUDA context, NCCL and the allocator's fragmentation
TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep and micro-condition embedders
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # models.LORA_TARGET_MODULES


# ---------------------------------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class Architecture:
    """What memory depends on in a PixArtTransformer2DModel config (and the parameter counts of its parts)."""

    num_layers: int
    num_heads: int
    head_dim: int
    cross_attention_dim: int
    caption_channels: int
    in_channels: int
    out_channels: int
    patch_size: int
    sample_size: int
    micro_conditions: bool
    parameters: int  # of the whole transformer
    lora_parameters_per_rank: int  # LoRA parameters of rank 1 on LORA_TARGETS (rank r: r times this)

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def tokens(self) -> int:
        return (self.sample_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, config: dict) -> Architecture:
        """From a transformer config.json (PixArt-alpha's or PixArt-Σ's); parameters counted on the meta device."""
        import torch
        from diffusers import PixArtTransformer2DModel

        keys = PixArtTransformer2DModel.extract_init_dict(dict(config))[0]
        with torch.device("meta"):
            module = PixArtTransformer2DModel(**keys)
        lora = sum(
            m.in_features + m.out_features
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS) and "transformer_blocks" in name
        )
        c = module.config
        micro = c.use_additional_conditions
        if micro is None:
            micro = c.sample_size == 128
        return cls(
            num_layers=c.num_layers,
            num_heads=c.num_attention_heads,
            head_dim=c.attention_head_dim,
            cross_attention_dim=c.cross_attention_dim or c.num_attention_heads * c.attention_head_dim,
            caption_channels=c.caption_channels,
            in_channels=c.in_channels,
            out_channels=c.out_channels or c.in_channels,
            patch_size=c.patch_size,
            sample_size=c.sample_size,
            micro_conditions=bool(micro),
            parameters=sum(p.numel() for p in module.parameters()),
            lora_parameters_per_rank=lora,
        )


def module_parameters(config: dict, kind: str) -> int:
    """Parameters of a T5 encoder ("text_encoder") or VAE ("vae") from its config.json, counted on the meta device."""
    import torch

    with torch.device("meta"):
        if kind == "text_encoder":
            from transformers import T5Config, T5EncoderModel

            module = T5EncoderModel(T5Config(**{k: v for k, v in config.items() if not k.startswith("_")}))
        else:
            from diffusers import AutoencoderKL

            module = AutoencoderKL(**AutoencoderKL.extract_init_dict(dict(config))[0])
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Saved tensors of a forward, op by op


@dataclass(frozen=True)
class _T:
    numel: int
    dtype: int  # bytes per element
    grad: bool  # requires grad
    storage: int  # id of the storage; views share it
    storage_bytes: int
    param: bool = False  # a parameter's own storage: parameter memory, not an activation


@dataclass
class _Weight:
    name: str
    numel: int
    dtype: int
    trained: bool  # requires grad (autocast caches casts of these leaves for the whole autocast region)


class _Trace:
    """Autograd's saved tensors for a sequence of forwards inside one autocast region (or none)."""

    def __init__(self, autocast: bool, device_type: str):
        self.autocast, self.device_type = autocast, device_type
        self.saved: dict[int, int] = {}  # storage -> bytes
        self.cast_cache: dict[str, _T] = {}  # autocast's cache of casts of trained fp32 weights
        self._ids = itertools.count()

    def total(self) -> int:
        return sum(self.saved.values())

    def new(self, numel: int, dtype: int, grad: bool) -> _T:
        return _T(numel, dtype, grad, next(self._ids), numel * dtype)

    def param(self, numel: int, dtype: int, trained: bool) -> _T:
        return _T(numel, dtype, trained, next(self._ids), numel * dtype, param=True)

    def view(self, t: _T, numel: int) -> _T:
        return replace(t, numel=numel)

    def save(self, *tensors: _T) -> None:
        for t in tensors:
            if not t.param:
                self.saved[t.storage] = max(self.saved.get(t.storage, 0), t.storage_bytes)

    def cast(self, t: _T, dtype: int) -> _T:
        return t if t.dtype == dtype else self.new(t.numel, dtype, t.grad)

    def _weight(self, w: _Weight) -> _T:
        """The weight as the op sees it: itself, or autocast's bf16 copy (cached if trained)."""
        if not self.autocast or w.dtype == BF16:
            return self.param(w.numel, w.dtype, w.trained)
        if not w.trained:
            return self.new(w.numel, BF16, False)
        if w.name not in self.cast_cache:
            self.cast_cache[w.name] = self.new(w.numel, BF16, True)
        return self.cast_cache[w.name]

    # ops -------------------------------------------------------------------------------------------------------------

    def linear(self, x: _T, w: _Weight, out_numel: int) -> _T:
        xc = self.cast(x, BF16) if self.autocast else x
        wc = self._weight(w)
        out = self.new(out_numel, BF16 if self.autocast else max(x.dtype, w.dtype), x.grad or w.trained)
        if w.trained:
            self.save(xc)  # for the weight's gradient
        if x.grad:
            self.save(wc)  # for the input's gradient
        return out

    def conv(self, x: _T, w: _Weight, out_numel: int) -> _T:
        """A convolution keeps its input and its weight whenever its output needs a gradient."""
        xc = self.cast(x, BF16) if self.autocast else x
        wc = self._weight(w)
        out = self.new(out_numel, BF16 if self.autocast else max(x.dtype, w.dtype), x.grad or w.trained)
        if out.grad:
            self.save(xc, wc)
        return out

    def layer_norm(self, x: _T, rows: int) -> _T:
        """LayerNorm without affine parameters over `rows` rows; CUDA's autocast runs it in fp32 (CPU's in its input's
        dtype)."""
        if self.autocast and self.device_type == "cuda":
            x = self.cast(x, FP32)
        if x.grad:
            self.save(x, self.new(rows, x.dtype, False), self.new(rows, x.dtype, False))  # input, mean, rstd
        return self.new(x.numel, x.dtype, x.grad)

    def plus_one(self, x: _T) -> _T:
        """1 + x: a new tensor, nothing kept."""
        return self.new(x.numel, x.dtype, x.grad)

    def mul(self, a: _T, b: _T, numel: int | None = None) -> _T:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(numel or max(a.numel, b.numel), max(a.dtype, b.dtype), a.grad or b.grad)

    def add(self, a: _T, b: _T, numel: int | None = None) -> _T:
        return self.new(numel or max(a.numel, b.numel), max(a.dtype, b.dtype), a.grad or b.grad)

    def pointwise(self, x: _T) -> _T:
        """GELU, SiLU: keep their input."""
        if x.grad:
            self.save(x)
        return self.new(x.numel, x.dtype, x.grad)

    def attention(self, q: _T, k: _T, v: _T, mask: _T | None, heads_rows: int) -> _T:
        """scaled_dot_product_attention (flash / memory-efficient): q, k, v, the output, the log-sum-exp (fp32, one
        per head and query) and the mask; `heads_rows` = batch x heads x queries."""
        if self.autocast:
            q, k, v = (self.cast(t, BF16) for t in (q, k, v))
            mask = mask and self.cast(mask, BF16)
        out = self.new(q.numel, q.dtype, q.grad or k.grad or v.grad)
        if out.grad:
            self.save(q, k, v, out, self.new(heads_rows, FP32, False))
            if mask is not None:
                self.save(mask)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The PixArt forward, symbolically


@dataclass(frozen=True)
class _Network:
    """How one network runs in a forward: its weights' dtype, whether they are trained, LoRA adapters."""

    name: str
    weight_dtype: int
    trained: bool
    lora_rank: int = 0  # adapters on q, k, v, out of both attentions (fp32)
    lora_trained: bool = False

    def weight(self, name: str, numel: int) -> _Weight:
        return _Weight(f"{self.name}.{name}", numel, self.weight_dtype, self.trained)


def pixart_forward(trace: _Trace, arch: Architecture, net: _Network, batch: int, text_tokens: int, x: _T, ckpt: bool):
    """The saved tensors of PixArtTransformer2DModel.forward on `x` (B, C, h, w) into `trace`; returns the output."""
    B, N, D, T = batch, arch.tokens, arch.width, text_tokens
    p, C, D3 = arch.patch_size, arch.in_channels, D // 3
    hidden_dtype = BF16 if trace.autocast else net.weight_dtype
    mask = trace.new(B * T, x.dtype, False)  # (1 - mask) * -10000, in x's dtype
    # 1. Patch embedding (a p x p convolution), plus the fixed positional table, cast back to the conv's dtype
    h = trace.conv(x, net.weight("pos_embed", D * C * p * p), B * N * D)
    h = trace.cast(trace.add(h, trace.new(N * D, FP32, False)), h.dtype)
    # 2. Timestep (and micro-condition) embedding, adaLN-single's 6 modulation rows
    t = trace.new(B * TIMESTEP_FEATURES, hidden_dtype, False)
    t = trace.linear(
        trace.pointwise(trace.linear(t, net.weight("t1", TIMESTEP_FEATURES * D), B * D)),
        net.weight("t2", D * D),
        B * D,
    )
    if arch.micro_conditions:
        for name, rows in (("res", 2 * B), ("ar", B)):
            m = trace.new(rows * TIMESTEP_FEATURES, hidden_dtype, False)
            m = trace.linear(m, net.weight(f"{name}1", TIMESTEP_FEATURES * D3), rows * D3)
            trace.linear(trace.pointwise(m), net.weight(f"{name}2", D3 * D3), rows * D3)
        t = trace.add(t, trace.new(B * D, hidden_dtype, net.trained))
    embedded_timestep = t
    t6 = trace.linear(trace.pointwise(t), net.weight("adaln", D * 6 * D), B * 6 * D)
    # 3. Caption projection: linear, GELU(tanh), linear
    c = trace.new(B * T * arch.caption_channels, hidden_dtype if trace.autocast else net.weight_dtype, False)
    c = trace.linear(c, net.weight("cap1", arch.caption_channels * D), B * T * D)
    c = trace.linear(trace.pointwise(c), net.weight("cap2", D * D), B * T * D)
    # 4. Blocks; with checkpointing a block keeps only its inputs (the shared ones once)
    for i in range(arch.num_layers):
        if ckpt:
            trace.save(h, c, t6, mask)
            h = trace.new(h.numel, h.dtype if not trace.autocast else _block_output_dtype(net), h.grad)
            continue
        h = _block(trace, arch, net, i, B, T, h, c, t6, mask)
    # 5. Output: final norm, modulation by (table + embedded timestep), projection
    table = trace.param(2 * D, net.weight_dtype, net.trained)
    shift_scale = trace.add(table, embedded_timestep, B * 2 * D)
    scale = trace.view(shift_scale, B * D)  # shift and scale: views of one (B, 2, D) tensor
    n = trace.layer_norm(h, B * N)
    n = trace.add(trace.mul(n, trace.plus_one(scale)), scale)
    out_channels = p * p * arch.out_channels
    return trace.linear(n, net.weight("proj_out", D * out_channels), B * N * out_channels)


def _block_output_dtype(net: _Network) -> int:
    """The residual stream's dtype: fp32 once an fp32 modulation table has gated it, else bf16."""
    return FP32 if net.weight_dtype == FP32 else BF16


def _lora(trace: _Trace, net: _Network, name: str, x: _T, fan_in: int, fan_out: int, rows: int, out: _T) -> _T:
    """peft's LoRA on a linear layer: x cast to the adapters' fp32, A (r x in), B (out x r), added to the output."""
    if not net.lora_rank:
        return out
    adapter = replace(net, weight_dtype=FP32, trained=net.lora_trained)
    xa = trace.cast(x, FP32)
    a = trace.linear(xa, adapter.weight(f"{name}.A", net.lora_rank * fan_in), rows * net.lora_rank)
    b = trace.linear(a, adapter.weight(f"{name}.B", fan_out * net.lora_rank), rows * fan_out)
    return trace.cast(trace.add(out, b), out.dtype)


def _block(trace: _Trace, arch: Architecture, net: _Network, i: int, B: int, T: int, h: _T, c: _T, t6: _T, mask: _T):
    """BasicTransformerBlock with norm_type ada_norm_single (diffusers' PixArt block), AttnProcessor2_0."""
    N, D, heads, Dc = arch.tokens, arch.width, arch.num_heads, arch.cross_attention_dim
    w = lambda name, numel: net.weight(f"{i}.{name}", numel)  # noqa: E731
    table = trace.param(6 * D, net.weight_dtype, net.trained)
    mod = trace.add(table, t6, B * 6 * D)  # shift/scale/gate rows are views of this (B, 6, D) tensor
    row = trace.view(mod, B * D)

    def modulate(x):
        n = trace.layer_norm(x, B * N)
        return trace.add(trace.mul(n, trace.plus_one(row)), row, B * N * D)  # norm * (1 + scale) + shift

    def attention(name, x, kv, kv_rows, attn_mask):
        q = _lora(trace, net, f"{i}.{name}.q", x, D, D, B * N, trace.linear(x, w(f"{name}.q", D * D), B * N * D))
        k = _lora(
            trace,
            net,
            f"{i}.{name}.k",
            kv,
            kv_width(kv),
            D,
            kv_rows,
            trace.linear(kv, w(f"{name}.k", kv_width(kv) * D), kv_rows * D),
        )
        v = _lora(
            trace,
            net,
            f"{i}.{name}.v",
            kv,
            kv_width(kv),
            D,
            kv_rows,
            trace.linear(kv, w(f"{name}.v", kv_width(kv) * D), kv_rows * D),
        )
        o = trace.attention(q, k, v, attn_mask, B * heads * N)  # laid out (B, N, heads, d): the reshape is a view
        return _lora(
            trace, net, f"{i}.{name}.out", o, D, D, B * N, trace.linear(o, w(f"{name}.out", D * D), B * N * D)
        )

    def kv_width(kv):
        return Dc if kv is c else D

    # self-attention, gated
    n = modulate(h)
    a = attention("attn1", n, n, B * N, None)
    h = trace.add(trace.mul(row, a), h)
    # cross-attention over the caption (no norm in PixArt), the mask repeated per head
    heads_mask = trace.new(B * heads * T, mask.dtype, False)
    a = attention("attn2", h, c, B * T, heads_mask)
    h = trace.add(a, h)
    # feed-forward D -> 4D (GELU tanh) -> D, gated
    n = modulate(h)
    f = trace.linear(n, w("ff1", D * 4 * D), B * N * 4 * D)
    f = trace.linear(trace.pointwise(f), w("ff2", 4 * D * D), B * N * D)
    return trace.add(trace.mul(row, f), h)


# ---------------------------------------------------------------------------------------------------------------------
# The run and its plan


@dataclass(frozen=True)
class RunSpec:
    """The resolved configuration of a run, as far as memory goes (the trainer's options of these names)."""

    architecture: Architecture
    batch_size: int = 4  # per GPU and micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"  # "no" or "bf16"
    gradient_checkpointing: bool = False
    fake_score_lora_rank: int = 0
    text_tokens: int = 120  # --max_sequence_length
    text_encoder_parameters: int = 0  # T5's
    text_encoder_resident: bool = True  # False with the embedding cache
    text_encoder_at_start: bool = False  # the cache is built at the start, with the networks on the GPU
    vae_parameters: int = 0
    use_ema: bool = False
    world_size: int = 1
    sharding: str = "none"
    guidance_scale: float = 4.5
    divergence_needs_input_grad: bool = True  # False for dmd: teacher and F under no_grad
    regression_every: int = 4  # 0: no regression term
    device_type: str = "cuda"

    @property
    def weight_bytes(self) -> int:
        return FP32 if self.mixed_precision == "no" else BF16

    @property
    def sharded(self) -> bool:
        return self.sharding != "none"

    def describe(self) -> str:
        a = self.architecture
        return (
            f"PixArt {a.parameters / 1e6:.3g}M parameters ({a.num_layers} layers x {a.width}), "
            f"{a.sample_size * 8} px, "
            f"batch {self.batch_size} per GPU"
            + (f" x {self.gradient_accumulation_steps} accumulated" if self.gradient_accumulation_steps > 1 else "")
            + f", {'fp32' if self.mixed_precision == 'no' else self.mixed_precision}, checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, fake score "
            f"{f'LoRA r={self.fake_score_lora_rank}' if self.fake_score_lora_rank else 'full copy'}, T5 "
            f"{'resident' if self.text_encoder_resident else 'cached'}, EMA {'on' if self.use_ema else 'off'}, "
            f"{self.world_size} process{'es' if self.world_size > 1 else ''}, sharding {self.sharding}"
        )


@dataclass
class Plan:
    """Bytes per GPU: `static` by component, `activations` by network at the generator step, `gradients` as held at
    the peak, the iteration's moments (`moments`, totals), and the peak."""

    spec: RunSpec
    static: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    gradients: dict[str, int] = field(default_factory=dict)
    moments: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.peak <= USABLE_FRACTION * gpu_memory_gb * GIB


def activations(spec: RunSpec, phase: str = "generator_step") -> dict[str, int]:
    """Saved-tensor bytes by network at one moment of the iteration: "generator_step" (G + guided teacher + frozen F
    + losses, just before the generator's backward), "generator_backward" (G's graph) or "fake_score_update" (G, when
    x0 is shared, + F's own graph). Under checkpointing, plus the block being recomputed then."""
    arch, B, autocast = spec.architecture, spec.batch_size, spec.mixed_precision != "no"
    trace = _Trace(autocast, spec.device_type)
    # Under FSDP2's bf16 policy G and F compute with gathered bf16 weights (no autocast copies); else fp32 masters.
    trained_dtype = BF16 if spec.sharded and autocast else FP32
    lora = spec.fake_score_lora_rank
    generator = _Network("G", trained_dtype, True)
    fake = _Network("F", spec.weight_bytes if lora else trained_dtype, not lora, lora, True)
    latent = B * arch.in_channels * arch.sample_size**2
    ckpt, shared_x0 = spec.gradient_checkpointing, spec.gradient_accumulation_steps == 1
    out = {}

    def run(name, net, batch, x):
        before = trace.total()
        pixart_forward(trace, arch, net, batch, spec.text_tokens, x, ckpt)
        out[name] = trace.total() - before

    if phase == "generator_backward":  # G's graph; under checkpointing its blocks are recomputed one at a time
        run("generator", generator, B, trace.new(latent, FP32, False))
        if ckpt:
            out["recomputed block"] = _one_block(spec, generator, B, True)
        return out
    if phase == "fake_score_update":
        if shared_x0:
            run("generator", generator, B, trace.new(latent, FP32, False))
        run("fake_score_update", fake, B, trace.new(latent, fake.weight_dtype, False))
        if ckpt:
            out["recomputed block"] = _one_block(spec, fake, B, False)
        return out
    run("generator", generator, B, trace.new(latent, FP32, False))
    if spec.divergence_needs_input_grad:
        guided = 2 if spec.guidance_scale != 1.0 else 1
        x_t = trace.new(guided * latent, spec.weight_bytes, True)
        teacher = _Network("T", spec.weight_bytes, False)
        run("teacher", teacher, guided * B, x_t)
        frozen = replace(fake, trained=False, lora_trained=False)
        run("fake_score", frozen, B, trace.new(latent, fake.weight_dtype, True))
        if ckpt:  # the backward starts by recomputing the teacher's last block
            out["recomputed block"] = _one_block(spec, teacher, guided * B, True)
    # The losses' own latent-sized tensors: 3 fp32 latents per sample and 1 per regression sample (counted on the
    # tiny and mid models: x_t and the epsilons' fp32 casts and differences, the regression residual).
    regression = B / spec.regression_every if spec.regression_every else 0
    out["losses"] = round((3 + regression / B) * latent * FP32)
    return out


def _one_block(spec: RunSpec, net: _Network, batch: int, input_grad: bool) -> int:
    """Saved-tensor bytes of one transformer block: what recomputing it under checkpointing holds at once."""
    arch = spec.architecture
    trace = _Trace(spec.mixed_precision != "no", spec.device_type)
    stream = _block_output_dtype(net) if trace.autocast else net.weight_dtype
    N, D, T = arch.tokens, arch.width, spec.text_tokens
    h = trace.new(batch * N * D, stream, input_grad or net.trained)
    c = trace.new(batch * T * D, BF16 if trace.autocast else net.weight_dtype, net.trained)
    t6 = trace.new(batch * 6 * D, BF16 if trace.autocast else net.weight_dtype, net.trained)
    mask = trace.new(batch * T, stream, False)
    _block(trace, arch, net, 0, batch, T, h, c, t6, mask)
    return trace.total()


def memory_plan(spec: RunSpec) -> Plan:
    """The per-GPU plan of a run (module docstring)."""
    arch, W = spec.architecture, spec.world_size
    shard = W if spec.sharded else 1
    lora = spec.fake_score_lora_rank
    n_g = arch.parameters
    n_f = lora * arch.lora_parameters_per_rank if lora else arch.parameters
    teacher_shard = W if (spec.sharding == "fsdp_teacher" or (spec.sharded and lora)) else 1
    adam = 2 * FP32  # AdamW's two fp32 moments per trained parameter
    plan = Plan(spec)
    s = plan.static
    s["generator parameters (fp32)"] = n_g * FP32 // shard
    s["generator optimiser states (AdamW)"] = n_g * adam // shard
    if spec.use_ema:
        s["generator EMA (fp32)"] = n_g * FP32 // shard
    s["fake score parameters (fp32" + (f", LoRA r={lora})" if lora else ")")] = n_f * FP32 // shard
    s["fake score optimiser states (AdamW)"] = n_f * adam // shard
    s["teacher parameters" + (" (LoRA base)" if lora else "")] = arch.parameters * spec.weight_bytes // teacher_shard
    s["VAE parameters"] = spec.vae_parameters * spec.weight_bytes
    if spec.text_encoder_resident:
        s["T5 parameters (resident)"] = spec.text_encoder_parameters * spec.weight_bytes
    if W > 1 and not spec.sharded:
        s["DDP gradient buckets (G and F)"] = (n_g + n_f) * FP32
    if spec.sharded:
        # The gathered weights of two blocks in flight (the running one and the prefetched next).
        block = (arch.parameters - _root_parameters(arch)) // arch.num_layers
        s["FSDP2 gathered blocks"] = 2 * block * spec.weight_bytes
    if spec.mixed_precision != "no" and not spec.sharded and not lora:
        # autocast keeps its bf16 copies of trained fp32 weights for the whole iteration: F's, made in its update,
        # are still cached at the generator step (G's are in G's graph and counted there).
        s["autocast's cached bf16 copy of F"] = n_f * BF16
    static = sum(s.values())

    gen, upd = activations(spec), activations(spec, "fake_score_update")
    backward = activations(spec, "generator_backward")
    plan.activations = gen
    # Gradients: DDP holds them whole; FSDP2 reduce-scatters each block's into its shard, except while accumulating
    # (no_sync), when each process keeps the unsharded fp32 sum until the last micro-batch.
    accumulating = spec.gradient_accumulation_steps > 1
    whole = not spec.sharded or accumulating
    grads_g = n_g * FP32 if whole else n_g * FP32 // W
    grads_f = n_f * FP32 if whole else n_f * FP32 // W
    plan.gradients = {"generator": grads_g, "fake score": grads_f}
    plan.moments = {
        "generator step": static + sum(gen.values()) + (grads_g if accumulating else 0),
        "generator backward": static + sum(backward.values()) + grads_g,
        "fake-score update": static + sum(upd.values()) + grads_f,
    }
    if spec.text_encoder_at_start:
        # The embedding cache is built after the networks are placed and before any optimiser state exists.
        before_training = sum(
            v for k, v in s.items() if "optimiser" not in k and "EMA" not in k and "autocast" not in k
        )
        plan.moments["embedding-cache build"] = before_training + spec.text_encoder_parameters * spec.weight_bytes
    return plan


def _root_parameters(arch: Architecture) -> int:
    """Parameters outside the transformer blocks (embeddings, adaLN-single, caption projection, output layer)."""
    D, p = arch.width, arch.patch_size
    n = D * arch.in_channels * p * p + D  # patch embedding
    n += TIMESTEP_FEATURES * D + D + D * D + D + D * 6 * D + 6 * D  # timestep embedder, adaLN-single
    n += arch.caption_channels * D + D + D * D + D  # caption projection
    n += 2 * D + D * p * p * arch.out_channels + p * p * arch.out_channels  # output table and projection
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Fitting


def _changes(spec: RunSpec):
    """(description, changed spec) of the ways to need less memory, cheapest first: caching T5 costs nothing but a
    pass over the captions; FSDP2 costs some all-gathers (small next to the compute on NVLink); checkpointing about
    1.4x the compute (docs/performance.md); sharding the teacher too, its all-gathers on every teacher call; a LoRA
    fake score changes the method; a smaller batch per GPU (same global batch by accumulation) utilises the GPU
    less."""
    if spec.text_encoder_resident and spec.text_encoder_parameters:
        yield "--text_embedding_cache DIR", replace(spec, text_encoder_resident=False, text_encoder_at_start=True)
    if spec.world_size > 1 and spec.sharding == "none":
        yield "--sharding fsdp", replace(spec, sharding="fsdp")
    if not spec.gradient_checkpointing:
        yield "--gradient_checkpointing", replace(spec, gradient_checkpointing=True)
    if spec.world_size > 1 and spec.sharding != "fsdp_teacher" and not spec.fake_score_lora_rank:
        yield "--sharding fsdp_teacher", replace(spec, sharding="fsdp_teacher")
    if not spec.fake_score_lora_rank:
        yield "--fake_score_lora_rank 64", replace(spec, fake_score_lora_rank=64)


def cheapest_fit(spec: RunSpec, gpu_memory_gb: float) -> tuple[list[str], Plan] | None:
    """The cheapest set of changes that makes the run fit (single changes first, then the cheapest ones combined,
    then halving the batch per GPU with accumulation keeping the global batch); None when nothing does."""
    single = list(_changes(spec))
    for description, changed in single:
        plan = memory_plan(changed)
        if plan.fits(gpu_memory_gb):
            return [description], plan
    applied, current = [], spec
    for description, _ in single:
        current = dict(_changes(current)).get(description, current)
        applied.append(description)
        plan = memory_plan(current)
        if plan.fits(gpu_memory_gb):
            return applied, plan
    while current.batch_size > 1:
        # Half the batch per GPU, twice the micro-batches: the same global batch (one sample less for an odd batch).
        current = replace(
            current,
            batch_size=current.batch_size // 2,
            gradient_accumulation_steps=current.gradient_accumulation_steps * 2,
        )
        plan = memory_plan(current)
        if plan.fits(gpu_memory_gb):
            return applied + [
                f"--train_batch_size {current.batch_size} --gradient_accumulation_steps "
                f"{current.gradient_accumulation_steps}"
            ], plan
    return None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def plan_report(plan: Plan, gpu_memory_gb: float) -> dict:
    """The plan as the dry run's JSON: GiB by component, the moments, the peak, whether it fits, the suggestion."""
    fits = plan.fits(gpu_memory_gb)
    report = {
        "configuration": plan.spec.describe(),
        "static_bytes": dict(plan.static),
        "gradient_bytes": dict(plan.gradients),
        "activation_bytes_at_generator_step": dict(plan.activations),
        "moment_bytes": dict(plan.moments),
        "peak_bytes": plan.peak,
        "peak_gib": round(plan.peak / GIB, 2),
        "peak_at": plan.peak_moment,
        "gpu_memory_gb": gpu_memory_gb,
        "usable_gib": round(USABLE_FRACTION * gpu_memory_gb, 2),
        "fits": fits,
        "suggestion": None,
    }
    if not fits:
        found = cheapest_fit(plan.spec, gpu_memory_gb)
        report["suggestion"] = (
            f"{' '.join(found[0])} (peak {found[1].peak / GIB:.1f} GiB)"
            if found
            else "nothing tried fits (checkpointing, FSDP2, a LoRA fake score, batch 1): a larger GPU"
        )
    return report


def format_plan(plan: Plan, gpu_memory_gb: float) -> str:
    """The plan as lines for a person."""
    report = plan_report(plan, gpu_memory_gb)
    lines = [f"Memory plan per GPU: {report['configuration']}"]
    for name, value in plan.static.items():
        lines.append(f"  {name:<44} {_gib(value):>12}")
    for name, value in plan.gradients.items():
        lines.append(f"  {name + ' gradients (at the peak)':<44} {_gib(value):>12}")
    acts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in plan.activations.items())
    lines.append(f"  activations at the generator step: {acts}")
    lines.append("  moments: " + ", ".join(f"{k} {_gib(v)}" for k, v in plan.moments.items()))
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(
        f"  peak {_gib(plan.peak)} ({plan.peak_moment}): {verdict} a {gpu_memory_gb:g} GB GPU "
        f"(usable {USABLE_FRACTION:.0%}: {report['usable_gib']:.1f} GiB)"
    )
    if report["suggestion"]:
        lines.append(f"  cheapest change that fits: {report['suggestion']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer's dry run


def _teacher_component_config(args, component: str) -> dict | None:
    """A component's config.json from the teacher folder or the Hub (a few kB; None when there is none)."""
    import json
    from pathlib import Path

    root = Path(args.pretrained_model_name_or_path)
    if root.is_dir():
        path = root / component / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(
                hf_hub_download(
                    args.pretrained_model_name_or_path,
                    f"{component}/config.json",
                    revision=args.revision,
                    cache_dir=args.cache_dir,
                )
            )
        except Exception:  # noqa: BLE001 - no such component, or offline: counted as absent
            return None
    return json.loads(path.read_text()) if path.is_file() else None


def run_spec_from_arguments(args) -> RunSpec:
    """The RunSpec of the trainer's resolved arguments (after `checks.validate`): the architecture read from the
    teacher's configs, the world size from the launcher (WORLD_SIZE)."""
    import os

    from ..losses import get_divergence
    from .run import needs_text_encoder

    text_encoder = _teacher_component_config(args, "text_encoder")
    vae = _teacher_component_config(args, "vae")
    cached = args.text_embedding_cache is not None
    return RunSpec(
        architecture=Architecture.from_config(_teacher_component_config(args, "transformer")),
        batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        gradient_checkpointing=args.gradient_checkpointing,
        fake_score_lora_rank=args.fake_score_lora_rank,
        text_tokens=args.max_sequence_length,
        text_encoder_parameters=module_parameters(text_encoder, "text_encoder") if text_encoder else 0,
        text_encoder_resident=not cached,
        text_encoder_at_start=cached and needs_text_encoder(args),
        vae_parameters=module_parameters(vae, "vae") if vae else 0,
        use_ema=args.use_ema,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        sharding=args.sharding,
        guidance_scale=args.guidance_scale,
        divergence_needs_input_grad=get_divergence(args.divergence).needs_input_grad,
        regression_every=args.regression_every if args.regression_loss_weight > 0 else 0,
    )
