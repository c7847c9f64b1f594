"""LAION aesthetic predictor v2: a linear MLP head on L2-normalised CLIP ViT-L/14 image embeddings (scale ~1-10)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _clip
from .base import RewardHead, Scorer, load_state_dict_file, resolve_file

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# A Hub copy of the v2 head (sac+logos+ava1-l14-linearMSE), the one TRL's DDPO example downloads.
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"
HEAD_FILENAMES = ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")


class AestheticScorer(Scorer):
    name = "aesthetic"
    display_name = "Aesthetic"
    short_name = "Aes"
    note = "LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings."

    def __init__(self, head: RewardHead, clip_model, clip_processor):
        if head.layers[0].in_features != clip_model.config.projection_dim:
            raise ValueError(
                f"The aesthetic head takes {head.layers[0].in_features}-d embeddings but the CLIP model projects to "
                f"{clip_model.config.projection_dim}: the v2 head needs CLIP ViT-L/14 (768)."
            )
        self.head = head.to(clip_model.device).eval()  # dropout off
        self.clip_model = clip_model
        self.clip_processor = clip_processor

    @classmethod
    def from_pretrained(cls, path=DEFAULT_HEAD, device="cpu", dtype=torch.float32, clip_model=DEFAULT_CLIP):
        """`path`: the head, as `.safetensors` or the upstream `.pth` state dict (file, folder or Hub id)."""
        head = RewardHead.from_state_dict(load_state_dict_file(resolve_file(path, HEAD_FILENAMES)))
        model, processor = _clip.load_clip(clip_model, device=device, dtype=dtype)
        return cls(head, model, processor)

    @torch.no_grad()
    def score_image_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, 768) CLIP image embeddings -> (N,) aesthetic scores; the head runs in float32 on unit-norm inputs."""
        return self.head(F.normalize(image_embeds.float(), dim=-1).to(self.head.layers[0].weight.device)).cpu()

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        self.check_batch(images, prompts)  # the aesthetic score ignores the prompts
        return self.score_image_embeds(_clip.image_embeds(self.clip_model, self.clip_processor, images))
