"""FID through torchmetrics' FrechetInceptionDistance with a feature extractor of your choice.

The feature extractor is any `nn.Module` mapping uint8 images (N, 3, S, S) to features (N, D). `from_pretrained`
builds one from a path: a TorchScript file (e.g. the Inception-v3 `inception-2015-12-05.pt` used by StyleGAN/EDM/SiD
for FID, called with `return_features=True`), or a transformers CLIP model (Hub id or folder: CLIP image embeddings,
"FID_CLIP"). The reference is a folder of images or statistics saved by `save_reference_stats` (safetensors with
`mu` and `sigma`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import _clip
from .base import Scorer

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TORCHSCRIPT_EXTENSIONS = (".pt", ".pth", ".jit", ".torchscript")


class TorchScriptFeatures(nn.Module):
    """A TorchScript feature network on uint8 images; passes `return_features=True` when its forward takes it."""

    def __init__(self, module, input_size: int = 299):
        super().__init__()
        self.module = module
        self.input_size = input_size
        arguments = [argument.name for argument in module.forward.schema.arguments]
        self.forward_kwargs = {"return_features": True} if "return_features" in arguments else {}
        with torch.no_grad():
            dummy = torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8, device=self._device())
            self.num_features = int(self.module(dummy, **self.forward_kwargs).shape[-1])

    def _device(self):
        return next(iter(self.module.parameters()), torch.empty(0)).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images, **self.forward_kwargs)


class CLIPImageFeatures(nn.Module):
    """Projected CLIP image embeddings of uint8 images already at the CLIP input size: (N, 3, S, S) -> (N, D)."""

    def __init__(self, model, image_processor):
        super().__init__()
        self.model = model
        self.input_size = image_processor.crop_size["height"]
        self.num_features = model.config.projection_dim
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = (images.float() / 255 - self.mean) / self.std
        return self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)).pooler_output.float()


def load_feature_extractor(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> nn.Module:
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(TORCHSCRIPT_EXTENSIONS):
        with warnings.catch_warnings():  # torch deprecates TorchScript, but FID's reference Inception ships as one
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=device)
        return TorchScriptFeatures(module.eval())
    model, processor = _clip.load_clip(path, device=device, dtype=dtype)
    return CLIPImageFeatures(model, processor.image_processor).to(device)


def to_uint8_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8: bicubic resize of the short side to `size`, then centre crop."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def list_images(folder: str | os.PathLike) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
    return files


class FIDScorer(Scorer):
    """FID of generated images against a fixed reference; `reset()` forgets the generated side only."""

    name = "fid"
    display_name = "FID"
    short_name = "FID"
    higher_is_better = False
    per_image = False
    note = "FID against the given reference; biased upwards at small sample counts, compare only equal counts."

    def __init__(self, feature_extractor: nn.Module, device="cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.input_size = getattr(feature_extractor, "input_size", 299)
        self.metric = FrechetInceptionDistance(feature=feature_extractor, reset_real_features=False).to(device)
        self.device = device

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, reference=None, batch_size=32):
        """`path`: the feature network (TorchScript file, or CLIP Hub id or folder); `reference`: a folder of images
        or a `.safetensors` file of statistics."""
        scorer = cls(load_feature_extractor(path, device, dtype), device)
        if reference is not None:
            if os.path.isfile(os.fspath(reference)):
                scorer.load_reference_stats(reference)
            else:
                scorer.update_reference_folder(reference, batch_size)
        return scorer

    @torch.no_grad()
    def update(self, images: Sequence[Image.Image], real: bool = False) -> None:
        self.metric.update(to_uint8_batch(images, self.input_size).to(self.device), real=real)

    def update_reference_folder(self, folder, batch_size: int = 32) -> None:
        files = list_images(folder)
        for start in range(0, len(files), batch_size):
            self.update([Image.open(f) for f in files[start : start + batch_size]], real=True)

    @property
    def num_reference(self) -> int:
        return int(self.metric.real_features_num_samples)

    def reference_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the reference features, float64."""
        n = self.metric.real_features_num_samples
        mu = self.metric.real_features_sum / n
        sigma = (self.metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def save_reference_stats(self, path) -> None:
        from safetensors.torch import save_file

        mu, sigma = self.reference_stats()
        metadata = {"num_samples": str(self.num_reference)}
        save_file({"mu": mu.cpu(), "sigma": sigma.cpu()}, os.fspath(path), metadata=metadata)

    def load_reference_stats(self, path) -> None:
        """Set the reference from saved mu and sigma; torchmetrics keeps sums, so rebuild them for n samples."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            mu, sigma = f.get_tensor("mu").double(), f.get_tensor("sigma").double()
            n = int((f.metadata() or {}).get("num_samples", 2))  # any n >= 2 gives back mu and sigma exactly
        if mu.shape != self.metric.real_features_sum.shape:
            raise ValueError(
                f"{path} holds {mu.numel()}-d statistics; the feature network gives "
                f"{self.metric.real_features_sum.numel()}."
            )
        device = self.metric.real_features_sum.device
        self.metric.real_features_sum = (mu * n).to(device)
        self.metric.real_features_cov_sum = (sigma * (n - 1) + n * torch.outer(mu, mu)).to(device)
        self.metric.real_features_num_samples = torch.tensor(n, device=device)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()
