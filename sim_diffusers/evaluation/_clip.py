"""CLIP through transformers, shared by the aesthetic predictor, CLIP score, PickScore and CLIP features for FID."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def load_clip(path: str | os.PathLike, processor_path: str | os.PathLike | None = None, device="cpu", dtype=None):
    """`CLIPModel` and `CLIPProcessor` from a Hub id or folder (the processor from `processor_path` when given)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(processor_path or path)
    return model, processor


def image_embeds(model, processor, images: Sequence) -> torch.Tensor:
    """Projected CLIP image embeddings, (N, projection_dim), float32, not normalised."""
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(model.device, model.dtype)
    return model.get_image_features(pixel_values=pixel_values).pooler_output.float()


def text_embeds(model, processor, prompts: Sequence[str]) -> torch.Tensor:
    """Projected CLIP text embeddings, (N, projection_dim), float32, not normalised; prompts truncated to 77 tokens."""
    tokens = processor(
        text=list(prompts),
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(model.device)
    features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return features.pooler_output.float()


def cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of paired (N, D) embeddings -> (N,)."""
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(dim=-1)
