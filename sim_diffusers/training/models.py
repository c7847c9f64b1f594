"""The three networks of SIM training and how they are called: generator G, fake score F, frozen teacher T.

The fake score is either a full trainable copy of the teacher, or (`lora_rank > 0`) LoRA adapters injected into the
frozen teacher itself through peft: the teacher is then the same module with its adapters switched off, which saves a
full model copy and its Adam states. Plain PyTorch; nothing here knows about Accelerate or DDP.

Sharding (`place_networks(..., sharding=Sharding(...))`) is FSDP2, `torch.distributed.fsdp.fully_shard`, applied here
the torchtitan way: each transformer block is one unit, then the root, so a network's weights, gradients and optimiser
states are split over the processes and a block's weights are all-gathered only while it runs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from ..generator import guided_eps, predict_eps

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_ADAPTER = "fake_score"  # peft adapter name of a LoRA fake score
# --sharding: what each process holds (`Sharding`).
SHARDING_STRATEGIES = {
    "none": "every process holds every network whole; gradients are all-reduced (DDP) when there are several",
    "fsdp": "FSDP2 of the generator and the fake score: weights, gradients, optimiser states and EMA split over the "
    "processes; the frozen teacher whole on each (with a LoRA fake score the teacher is F's module: split too)",
    "fsdp_teacher": "as fsdp, and the frozen teacher split as well",
}
# Where a checkpoint written under FSDP2 keeps its optimiser states (training.distributed); without sharding they are
# Accelerate's optimizer*.bin.
SHARDED_OPTIMIZER_DIR = "optimizers"


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class ScoreNetworks:
    """The teacher and the fake score, with the calls the two SIM updates make.

    teacher: frozen PixArt transformer in the weight dtype. fake_score: the trainable module (a full copy, or the
    teacher itself carrying LoRA adapters). `fake_score_module` is what the caller prepared for distributed training
    (e.g. the DDP wrapper) and is used for the fake-score update; generator-step calls use the plain module.
    """

    def __init__(self, teacher, fake_score, lora: bool):
        self.teacher = teacher
        self.fake_score = fake_score
        self.lora = lora
        self._adapters_on, self._fake_trainable = True, True
        self.teacher_sharded = False  # FSDP2: every teacher forward is then a collective that all processes make

    @classmethod
    def build(
        cls, teacher, lora_rank: int = 0, lora_alpha: float | None = None, trainable_dtype=torch.float32, seed: int = 0
    ):
        """`seed` draws the LoRA adapters' initial weights (peft draws them from torch's global generator, which
        nothing else seeds: without it two runs with the same --seed would start from different fake scores)."""
        teacher.requires_grad_(False).eval()
        if lora_rank <= 0:
            fake_score = copy.deepcopy(teacher).to(trainable_dtype).requires_grad_(True)
            fake_score.train()
            return cls(teacher, fake_score, lora=False)
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or lora_rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, teacher, adapter_name=LORA_ADAPTER)
        for name, param in teacher.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(trainable_dtype)
                param.requires_grad_(True)
        return cls(teacher, teacher, lora=True)

    def fake_score_parameters(self):
        """F's trainable parameters as the module holds them now. Under FSDP2 (`Sharding.apply`) these are its shards
        between calls, and FSDP2 copies their requires_grad to the gathered weights each time it gathers a block, so
        freezing them here freezes F; inside a checkpointed block's recomputation they are the gathered weights,
        frozen and unfrozen again around it."""
        return [p for n, p in self.fake_score.named_parameters() if (not self.lora or "lora_" in n)]

    # The switchable state of the shared modules: (LoRA adapters on, F's parameters trainable). Activation
    # checkpointing recomputes a block during backward, after the context that set this state has exited; the
    # recomputation must see the state of the original forward (see `enable_gradient_checkpointing`).
    def _state(self) -> tuple[bool, bool]:
        return self._adapters_on, self._fake_trainable

    @contextlib.contextmanager
    def _set_state(self, adapters_on: bool, fake_trainable: bool):
        previous = self._state()
        self._apply(adapters_on, fake_trainable)
        try:
            yield
        finally:
            self._apply(*previous)

    def _apply(self, adapters_on: bool, fake_trainable: bool) -> None:
        if self.lora and adapters_on != self._adapters_on:
            for layer in _tuner_layers(self.teacher):
                layer.enable_adapters(adapters_on)  # peft also flips the adapters' requires_grad here
        if fake_trainable != self._fake_trainable or self.lora:
            for p in self.fake_score_parameters():
                p.requires_grad_(fake_trainable)
        self._adapters_on, self._fake_trainable = adapters_on, fake_trainable

    def teacher_mode(self):
        """Inside, `self.teacher` computes the teacher's epsilon (LoRA adapters switched off when present)."""
        return self._set_state(False, self._fake_trainable)

    def fake_score_frozen(self):
        """The generator step: F's parameters take no gradient (x_t still does, through F)."""
        return self._set_state(self._adapters_on, False)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the teacher's and F's blocks, recomputing each under the state of its original forward."""

        def checkpoint(block, *args):
            state = self._state()
            return torch.utils.checkpoint.checkpoint(
                block.__call__,
                *args,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self._set_state(*state)),
            )

        for module in {id(m): m for m in (self.teacher, self.fake_score)}.values():
            module.enable_gradient_checkpointing(checkpoint)

    def teacher_eps(self, x_t, timesteps, cond, uncond, guidance_scale, added_cond_kwargs=None):
        """Guided teacher epsilon in one batched forward; cond/uncond are (embeds, mask) pairs."""
        dtype = self.teacher.dtype
        with self.teacher_mode():
            return guided_eps(
                self.teacher,
                x_t.to(dtype),
                timesteps,
                cond[0].to(dtype),
                cond[1],
                uncond[0].to(dtype),
                uncond[1],
                guidance_scale,
                added_cond_kwargs,
            )

    def fake_eps(self, x_t, timesteps, cond, added_cond_kwargs=None, module=None):
        """F's epsilon; `module` is the distributed wrapper for F's own update, the plain module otherwise."""
        dtype = self.fake_score.dtype  # the base weights' dtype (LoRA adapters cast their input themselves)
        return predict_eps(
            module or self.fake_score, x_t.to(dtype), timesteps, cond[0].to(dtype), cond[1], added_cond_kwargs
        )


def cast_trainable_to_fp32(model):
    """Trainable weights keep fp32 master copies under mixed precision, as the diffusers training scripts do."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


@dataclass(frozen=True)
class Sharding:
    """FSDP2 of the networks over the processes of `mesh` (a 1-D `DeviceMesh`: every process holds 1/world of each
    sharded network's weights, gradients and optimiser states).

    param_dtype: the dtype a block's weights are all-gathered and computed in (bf16 under bf16 mixed precision, so
    the fp32 master weights never exist unsharded; None: their own dtype). Gradients are reduce-scattered in fp32.
    teacher: shard the frozen teacher as well (with a LoRA fake score it is always sharded: it is F's module).
    """

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    param_dtype: torch.dtype | None = None
    teacher: bool = False

    def networks(self, generator, networks: ScoreNetworks) -> list:
        sharded = [generator, networks.fake_score] + ([networks.teacher] if self.teacher else [])
        return _unique(*sharded)

    def apply(self, module) -> None:
        """fully_shard each transformer block, then the root (patch and caption embeddings, adaLN-single, output
        layer). Every unit frees its gathered weights after each forward, the root too (FSDP2 would keep the root's
        gathered until the backward, and after a no-grad forward until the next one): so between calls a network
        holds only its shards, the parameters that the optimiser, the EMA, the checkpoints and
        ScoreNetworks' freezing see are always the sharded ones, and no forward reuses a gathered copy older than an
        optimiser step (a root keeping its gathered weights would show the EMA and validation a mix of shards and
        plain tensors, and they fail on it). The root is small; its weights are gathered once more for the
        backward."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for block in module.transformer_blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(module, mesh=self.mesh, mp_policy=policy)
        module.set_reshard_after_forward(True)


def place_networks(
    generator,
    networks: ScoreNetworks,
    device,
    gradient_checkpointing: bool = False,
    xformers: bool = False,
    sharding: Sharding | None = None,
) -> None:
    """The one place that puts built networks on their device and applies activation checkpointing, the attention
    kernel and sharding to them (the trainer and the step benchmark both call it). Sharding comes last, on networks
    that are complete: FSDP2 takes each process's slice of the weights it finds, which are the same on every process
    (all are built from the same teacher and seed)."""
    for module in _unique(generator, networks.teacher, networks.fake_score):
        module.to(device)
    if gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        networks.enable_gradient_checkpointing()  # the generator step backpropagates through teacher and F
    if xformers:
        for module in _unique(generator, networks.teacher, networks.fake_score):
            module.enable_xformers_memory_efficient_attention()
    if sharding is not None:
        for module in sharding.networks(generator, networks):
            sharding.apply(module)
        networks.teacher_sharded = is_sharded(networks.teacher)


def is_sharded(module) -> bool:
    """Whether FSDP2 has sharded `module` (its class is then a subclass made by fully_shard)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unsharded_class(module) -> type:
    """The module's own class (PixArtTransformer2DModel), also after fully_shard has swapped in its FSDP subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _unique(*modules):
    """The distinct modules (a LoRA fake score is the teacher module itself)."""
    return list({id(m): m for m in modules}.values())
