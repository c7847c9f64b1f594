"""What every scorer shares: the interface, the linear reward head, checkpoint and Hub-file loading, and summaries.

A per-image scorer is called as `scorer(images, prompts)` with a list of PIL images and their prompts and returns a
float32 CPU tensor of shape (N,), one score per image. A set-level metric (FID) has `per_image = False` and is fed with
`update(images)` and read with `compute()` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

# Hidden widths of the LAION aesthetic predictor v2 head, which ImageReward reuses unchanged.
REWARD_HEAD_WIDTHS = (1024, 128, 64, 16)


class Scorer:
    """Base class. Subclasses set the class attributes and implement `from_pretrained` and `__call__`."""

    name: str = ""  # key in results.json and on the command line
    display_name: str = ""  # column title in the report
    short_name: str = ""  # label of per-image scores under the report's images
    higher_is_better: bool = True
    per_image: bool = True
    note: str = ""  # one line shown under the report's table

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, **options) -> Scorer:
        raise NotImplementedError

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def check_batch(images: Sequence, prompts: Sequence[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts: give one prompt per image.")


class RewardHead(nn.Module):
    """The LAION aesthetic v2 MLP head, also ImageReward's: input -> 1024 -> 128 -> 64 -> 16 -> 1.

    Upstream comments the ReLUs out, so the head is an affine map of its input; the Dropouts sit at indices 1, 3, 5 of
    `layers`, which is why checkpoints name their Linears `layers.{0,2,4,6,7}`. Keeping the same Sequential keeps those
    names loadable as they are.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        w1, w2, w3, w4 = REWARD_HEAD_WIDTHS
        self.layers = nn.Sequential(
            nn.Linear(input_size, w1),
            nn.Dropout(0.2),
            nn.Linear(w1, w2),
            nn.Dropout(0.2),
            nn.Linear(w2, w3),
            nn.Dropout(0.1),
            nn.Linear(w3, w4),
            nn.Linear(w4, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, input_size) -> (N,)."""
        return self.layers(features).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> RewardHead:
        """Build the head from `{prefix}layers.{0,2,4,6,7}.{weight,bias}`; the input size is read from layer 0."""
        head_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix + "layers.")}
        if "layers.0.weight" not in head_state:
            found = sorted(state_dict)[:8]
            raise ValueError(f"No reward head under '{prefix}layers.0.weight' in the checkpoint; first keys: {found}.")
        head = cls(input_size=head_state["layers.0.weight"].shape[1])
        head.load_state_dict(head_state, strict=True)
        return head.eval()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from a PyTorch pickle loaded with `weights_only=True` (no code runs)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    return state_dict


def resolve_file(path: str | os.PathLike, filenames: Sequence[str]) -> str:
    """A local file for `path`: the file itself, the first of `filenames` in a folder, or a Hub download.

    Hub ids may name the file as `owner/repo:filename`; otherwise `filenames` are tried in order.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for filename in filenames:
            candidate = os.path.join(path, filename)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"None of {list(filenames)} is in the folder {path}.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, filename = path.partition(":")
    if filename:
        return hf_hub_download(repo_id, filename)
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename)
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(
        f"None of {list(filenames)} is in the Hub repository {repo_id}; name it as {repo_id}:FILE."
    )


def summarize(scores: torch.Tensor | Sequence[float]) -> dict:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); sem is None for a single score."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    n = scores.numel()
    mean = scores.mean().item() if n else math.nan
    sem = (scores.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else None
    return {"mean": mean, "sem": sem, "n": n}
