"""CLIP score as torchmetrics defines it: 100 * max(cos(image, text), 0), here per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _clip
from .base import Scorer

DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIPScore model


def clip_score_from_embeds(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,): 100 * max(cosine, 0)."""
    return 100 * _clip.cosine(image_embeds, text_embeds).clamp(min=0)


class CLIPScoreScorer(Scorer):
    name = "clip_score"
    display_name = "CLIP score"
    short_name = "CLIP"
    note = "CLIP score = 100 * max(cos, 0), torchmetrics' definition, per image."

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path=DEFAULT_MODEL, device="cpu", dtype=torch.float32, processor=None):
        """`path`: a transformers CLIPModel (Hub id or folder); `processor`: its processor, if stored elsewhere."""
        return cls(*_clip.load_clip(path, processor, device=device, dtype=dtype))

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        image = _clip.image_embeds(self.model, self.processor, images)
        text = _clip.text_embeds(self.model, self.processor, prompts)
        return clip_score_from_embeds(image, text).cpu()
