"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on human preferences.

Upstream's score is logit_scale.exp() * cos(image, text); the SIM paper reports the raw cosine (0.223 for SIM,
0.226 for PixArt-alpha), and so do we. Multiply by the model's logit scale (`scorer.logit_scale`) for upstream's scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _clip
from .base import Scorer

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor upstream's example loads


class PickScoreScorer(Scorer):
    name = "pickscore"
    display_name = "PickScore"
    short_name = "PS"
    note = "PickScore reported as the raw cosine, as in the SIM paper (upstream multiplies it by logit_scale, ~100)."

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    @classmethod
    def from_pretrained(cls, path=DEFAULT_MODEL, device="cpu", dtype=torch.float32, processor=DEFAULT_PROCESSOR):
        """`path`: the PickScore CLIPModel (Hub id or folder); `processor`: the CLIP-H processor (Hub id or folder)."""
        return cls(*_clip.load_clip(path, processor, device=device, dtype=dtype))

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        image = _clip.image_embeds(self.model, self.processor, images)
        text = _clip.text_embeds(self.model, self.processor, prompts)
        return _clip.cosine(image, text).cpu()
