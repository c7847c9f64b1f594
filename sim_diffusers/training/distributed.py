"""Sharded training (FSDP2): the process mesh, the accelerator the iteration runs with, and checkpoints of sharded
state.

The project applies `torch.distributed.fsdp.fully_shard` itself (`models.place_networks`), not through Accelerate's
FSDP plugin: the plugin does not shard on CPU (it falls back to DDP, so nothing could test it here), and it wraps the
modules it prepares, where SIM calls the fake score both as a trainable module and, frozen, inside the generator's
loss. Accelerate still launches the processes, forms the process group, autocasts, logs, and saves RNG states; it is
given no model, optimiser or scheduler to prepare (its DDP would replicate the sharded networks, and its checkpoint of
a sharded optimiser would hold the main process's shard only).

Checkpoints are gathered, not sharded. Weights are written as full diffusers folders (`generator/`, `fake_score/` or
`fake_score_lora/`, `generator_ema/`, the same files as without sharding) and optimiser states as full safetensors
files by parameter name (`optimizers/`), by the main process; on resume the main process reads them and broadcasts
them, and every process keeps its shard (`torch.distributed.checkpoint.state_dict`). So a sharded checkpoint resumes on
any number of processes, holds no pickle, and its weights load with `from_pretrained`. The cost: while saving, the main
process holds one network's full optimiser state in CPU memory (8 bytes per parameter, about 5 GB for a 600M network).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from .models import LORA_ADAPTER, Sharding, is_sharded, unsharded_class
from .models import SHARDED_OPTIMIZER_DIR as OPTIMIZER_DIR

OPTIMIZER_STATE = "state.json"  # param groups and schedules of both optimisers
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' single-file weights


def sharding_for(name: str, device: torch.device, weight_dtype: torch.dtype) -> Sharding | None:
    """The `Sharding` of a --sharding name over all processes of the (already initialised) default process group;
    None for "none". Under bf16 (or fp16) the fp32 master weights are all-gathered in that dtype."""
    if name == "none":
        return None
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (get_world_size(),))
    param_dtype = None if weight_dtype == torch.float32 else weight_dtype
    return Sharding(mesh, param_dtype=param_dtype, teacher=name == "fsdp_teacher")


class ShardedAccelerator(Accelerator):
    """Accelerate for networks sharded by `models.place_networks`: the operations `SIMIteration` calls that differ for
    FSDP2 modules. `backward` and `autocast` are Accelerate's (fp16, whose gradient scaler would have to be FSDP's
    sharded one, is refused before launch).

    no_sync: FSDP2 keeps the unsharded gradients of the micro-batches and reduce-scatters once, on the last one (as
    DDP's no_sync; the price is one unsharded gradient of the network while accumulating). clip_grad_norm_: the total
    norm over every process's shard (a plain tensor, the same on every process, so that the NaN guard decides alike).
    """

    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        from torch.distributed.tensor import DTensor

        norm = super().clip_grad_norm_(parameters, max_norm, norm_type)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def _copy_local(targets, sources) -> None:
    targets = [_local(t) for t in targets]
    torch._foreach_copy_(targets, [_local(s).to(t.device) for t, s in zip(targets, sources)])


class ShardedEMAModel(EMAModel):
    """diffusers' EMA of a sharded (FSDP2) generator: its shadow weights are DTensors sharded like G's. Its foreach
    update runs on them as it is; its foreach copies (`aten._foreach_copy_`, in copy_to and restore) have no DTensor
    rule, so these copy shard by shard, which is the same copy (each process holds the same slice of both)."""

    def store(self, parameters) -> None:
        self.temp_stored_params = [_local(p).detach().cpu().clone() for p in parameters]

    def copy_to(self, parameters) -> None:
        _copy_local(list(parameters), self.shadow_params)

    def restore(self, parameters) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        _copy_local(list(parameters), self.temp_stored_params)
        self.temp_stored_params = None


# ---------------------------------------------------------------------------------------------------------------------
# Gathering


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _is_main() -> bool:
    return torch.distributed.get_rank() == 0


def _gather(tensor: torch.Tensor) -> torch.Tensor | None:
    """The full tensor on the main process's CPU, None elsewhere (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().cpu() if _is_main() else None


def gathered_state_dict(module) -> dict:
    """The module's full state dict on the main process's CPU ({} elsewhere; every process must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def plain_module(module, state_dict: dict):
    """An unsharded module of `module`'s own class and config holding `state_dict` (built without initialising
    weights that are replaced at once)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        plain = unsharded_class(module).from_config(module.config)
    plain.load_state_dict(state_dict, assign=True)
    return plain


def final_generator(accelerator, models):
    """The generator to save, unsharded, on the main process (its EMA weights when kept); None elsewhere. Every
    process must call it: sharded weights are gathered."""
    if not is_sharded(models.generator):
        if not accelerator.is_main_process:
            return None
        final = accelerator.unwrap_model(models.generator)
        if models.ema is not None:
            final = type(final).from_config(final.config)
            models.ema.copy_to(final.parameters())
        return final
    state_dict = gathered_state_dict(models.generator)
    if models.ema is not None:
        names = [name for name, _ in models.generator.named_parameters()]
        shadows = [_gather(s) for s in models.ema.shadow_params]
        state_dict.update(zip(names, shadows))
    return plain_module(models.generator, state_dict) if accelerator.is_main_process else None


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def register_sharded_checkpoint_hooks(accelerator, models) -> None:
    """Make `accelerator.save_state` / `load_state` write and read the sharded networks, EMA, optimisers and
    schedules (`models`: the iteration's `TrainingModels`); Accelerate itself then saves only the RNG states."""

    def save_hook(_models, weights, output_dir):
        save_sharded_state(models, Path(output_dir))
        weights.clear()

    def load_hook(_models, input_dir):
        load_sharded_state(models, Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _trained(models):
    """(name, module, optimiser, scheduler) of the two trained networks."""
    return (
        ("generator", models.generator, models.generator_optimizer, models.generator_scheduler),
        ("fake_score", models.fake_score, models.fake_score_optimizer, models.fake_score_scheduler),
    )


def save_sharded_state(models, directory: Path) -> None:
    """Write G, F (or its LoRA adapters), the EMA and both optimisers' states and schedules, gathered, into
    `directory` (every process must call it; the main process writes)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    main, networks = _is_main(), models.networks
    # 1. Weights, as diffusers folders
    state_dict = gathered_state_dict(models.generator)
    if main:
        plain_module(models.generator, state_dict).save_pretrained(directory / "generator", safe_serialization=True)
    if networks.lora:
        lora = {n: _gather(p) for n, p in networks.fake_score.named_parameters() if "lora_" in n}
        if main:
            lora = get_peft_model_state_dict(networks.fake_score, state_dict=lora, adapter_name=LORA_ADAPTER)
            (directory / "fake_score_lora").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in lora.items()},
                str(directory / "fake_score_lora" / "adapter_model.safetensors"),
            )
    else:
        state_dict = gathered_state_dict(networks.fake_score)
        if main:
            plain_module(networks.fake_score, state_dict).save_pretrained(
                directory / "fake_score", safe_serialization=True
            )
    del state_dict
    # 2. EMA: the gathered shadow weights in an EMAModel folder
    if models.ema is not None:
        shadows = [_gather(s) for s in models.ema.shadow_params]
        if main:
            gathered = copy.copy(models.ema)  # shares the settings; the copy's shadows are the full tensors
            gathered.shadow_params = shadows
            gathered.save_pretrained(str(directory / "generator_ema"))
    # 3. Optimiser states by parameter name (safetensors) and their param groups and schedules (JSON)
    meta = {"world_size": torch.distributed.get_world_size()}
    for name, module, optimizer, scheduler in _trained(models):
        state = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
        if main:
            (directory / OPTIMIZER_DIR).mkdir(parents=True, exist_ok=True)
            tensors = {f"{fqn}/{key}": v for fqn, s in state["state"].items() for key, v in s.items()}
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(directory / OPTIMIZER_DIR / f"{name}.safetensors")
            )
            meta[name] = {"param_groups": state["param_groups"], "scheduler": scheduler.state_dict()}
    if main:
        (directory / OPTIMIZER_DIR / OPTIMIZER_STATE).write_text(json.dumps(meta, indent=2))


def _load_into(module, state_dict: dict, strict: bool = True) -> None:
    """Full tensors read by the main process ({} elsewhere) into a sharded module: broadcast, each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state_dict, options=_full_options(broadcast_from_rank0=True, strict=strict))


def load_sharded_state(models, directory: Path) -> None:
    """Inverse of `save_sharded_state` (every process must call it; the main process reads the files)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    main, networks = _is_main(), models.networks
    _load_into(models.generator, load_file(str(directory / "generator" / WEIGHTS_NAME)) if main else {})
    if networks.lora:
        lora = {}
        if main:
            names = {n.replace(f".{LORA_ADAPTER}.", "."): n for n, _ in networks.fake_score.named_parameters()}
            saved = load_file(str(directory / "fake_score_lora" / "adapter_model.safetensors"))
            lora = {names[k]: v for k, v in saved.items()}
        _load_into(networks.fake_score, lora, strict=False)
    else:
        _load_into(networks.fake_score, load_file(str(directory / "fake_score" / WEIGHTS_NAME)) if main else {})
    if models.ema is not None:
        folder = directory / "generator_ema"
        config = unsharded_class(models.generator).load_config(folder)
        settings = {k: config[k] for k in models.ema.state_dict() if k != "shadow_params" and k in config}
        names = [name for name, _ in models.generator.named_parameters()]
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:  # every process reads its slice
            shadows = [
                distribute_tensor(f.get_tensor(n).to(s.device), s.device_mesh, s.placements, src_data_rank=None)
                for n, s in zip(names, models.ema.shadow_params)
            ]
        models.ema.load_state_dict({**settings, "shadow_params": shadows})
    meta = json.loads((directory / OPTIMIZER_DIR / OPTIMIZER_STATE).read_text())
    for name, module, optimizer, scheduler in _trained(models):
        state = {}
        if main:
            state = {"state": {}, "param_groups": meta[name]["param_groups"]}
            for key, tensor in load_file(str(directory / OPTIMIZER_DIR / f"{name}.safetensors")).items():
                fqn, _, entry = key.rpartition("/")
                state["state"].setdefault(fqn, {})[entry] = tensor
        set_optimizer_state_dict(module, optimizer, state, options=_full_options(broadcast_from_rank0=True))
        scheduler.load_state_dict(meta[name]["scheduler"])
