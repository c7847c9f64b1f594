"""ImageReward (Xu et al., 2023) re-implemented on transformers' BLIP, because the `image-reward` package does not
import with transformers 5.

ImageReward is BLIP (ViT-L/16 image encoder, BERT-base text encoder with cross-attention to the image tokens) and the
aesthetic-v2-shaped head on the text encoder's [CLS] output, standardised by the training set's mean and std. We
load upstream's own checkpoint (`ImageReward.pt` + `med_config.json`, e.g. from the Hub repo `THUDM/ImageReward`)
into `transformers.BlipVisionModel` and `BlipTextModel` by renaming keys; see docs/evaluation.md for what is verified.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import torch

from .base import RewardHead, Scorer, load_state_dict_file, resolve_file

DEFAULT_MODEL = "THUDM/ImageReward"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"  # upstream's BertTokenizer('bert-base-uncased')
CHECKPOINT_FILENAMES = ("ImageReward.pt",)
MED_CONFIG_FILENAME = "med_config.json"

# Upstream's reward standardisation and prompt length.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
HEAD_PREFIX = "mlp."

# BLIP's timm-style ViT names -> transformers' BlipVisionModel names.
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    raise KeyError(f"No rule to rename the BLIP vision weight {key!r}.")


def convert_imagereward_state_dict(state_dict: dict[str, torch.Tensor]):
    """Split upstream's state dict into (vision, text, head) state dicts with transformers' names.

    BLIP's text encoder (med.py) already uses the names transformers' BlipTextModel kept; only its `position_ids`
    buffer, which transformers does not save, is dropped. The contrastive projections (`blip.vision_proj`,
    `blip.text_proj`) are not used by ImageReward and are ignored, as upstream's own loader ignores what it lacks.
    """
    vision, text, head = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith(VISION_PREFIX):
            vision[_rename(key[len(VISION_PREFIX) :], VISION_RENAMES)] = value
        elif key.startswith(TEXT_PREFIX) and not key.endswith("embeddings.position_ids"):
            text[key[len(TEXT_PREFIX) :]] = value
        elif key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX) :]] = value
    if not vision or not text or not head:
        raise ValueError(
            f"Not an ImageReward checkpoint: expected keys under '{VISION_PREFIX}', '{TEXT_PREFIX}' and "
            f"'{HEAD_PREFIX}', found {sorted({k.split('.')[0] for k in state_dict})}."
        )
    return vision, text, head


def blip_configs(vision_state: dict[str, torch.Tensor], med_config: dict):
    """transformers configs for the checkpoint: the ViT's shape read from its weights, the text encoder's from
    med_config.json. BLIP's ViT-B/16 and ViT-L/16 both use 64-dimensional attention heads."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision_state["embeddings.class_embedding"].shape[-1]
    patch_size = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision_state["embeddings.position_embedding"].shape[1] - 1  # minus the class token
    depth = len({k.split(".")[2] for k in vision_state if k.startswith("encoder.layers.")})
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // 64,
        image_size=patch_size * math.isqrt(num_patches),
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # timm's ViT, which BLIP builds on
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,  # upstream overrides med_config's encoder_width with the ViT's width
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        is_decoder=True,  # transformers builds the cross-attention layers only for a "decoder"
    )
    return vision_config, text_config


def load_blip_tokenizer(path, vocab_size: int):
    """BERT's uncased tokenizer with BLIP's two added tokens ([DEC] as bos, [ENC]), as upstream's init_tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"The tokenizer at {path} has {len(tokenizer)} tokens with BLIP's [DEC] and [ENC], but the checkpoint's "
            f"vocabulary has {vocab_size}: ImageReward needs bert-base-uncased's tokenizer."
        )
    return tokenizer


class ImageRewardScorer(Scorer):
    name = "imagereward"
    display_name = "ImageReward"
    short_name = "IR"
    note = "ImageReward: upstream weights through our transformers-BLIP port (see docs/evaluation.md)."

    def __init__(self, vision_model, text_encoder, head: RewardHead, tokenizer, image_processor):
        self.vision_model = vision_model
        self.text_encoder = text_encoder
        self.head = head.to(vision_model.device).eval()  # dropout off
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path=DEFAULT_MODEL, device="cpu", dtype=torch.float32, tokenizer=DEFAULT_TOKENIZER):
        """`path`: upstream's `ImageReward.pt` with `med_config.json` beside it (file, folder or Hub id);
        `tokenizer`: bert-base-uncased's tokenizer (Hub id or folder)."""
        from transformers import BlipTextModel, BlipVisionModel, CLIPImageProcessorPil

        checkpoint = resolve_file(path, CHECKPOINT_FILENAMES)
        if os.path.isfile(os.fspath(path)) or os.path.isdir(os.fspath(path)):
            med_config_file = os.path.join(os.path.dirname(checkpoint), MED_CONFIG_FILENAME)
            if not os.path.isfile(med_config_file):
                raise FileNotFoundError(f"{MED_CONFIG_FILENAME} must sit beside {checkpoint}.")
        else:
            med_config_file = resolve_file(f"{os.fspath(path).partition(':')[0]}:{MED_CONFIG_FILENAME}", ())
        with open(med_config_file, encoding="utf-8") as f:
            med_config = json.load(f)

        vision_state, text_state, head_state = convert_imagereward_state_dict(load_state_dict_file(checkpoint))
        vision_config, text_config = blip_configs(vision_state, med_config)
        vision_model = BlipVisionModel(vision_config)
        vision_model.load_state_dict(vision_state, strict=True)
        text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        text_encoder.load_state_dict(text_state, strict=True)
        head = RewardHead.from_state_dict(head_state)

        # Upstream's transform is CLIP's: bicubic resize of the short side, centre crop, CLIP mean and std.
        size = vision_config.image_size
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        return cls(
            vision_model.to(device, dtype).eval().requires_grad_(False),
            text_encoder.to(device, dtype).eval().requires_grad_(False),
            head.to(device),
            load_blip_tokenizer(tokenizer, text_config.vocab_size),
            image_processor,
        )

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        device, dtype = self.vision_model.device, self.vision_model.dtype
        pixel_values = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        image_tokens = self.vision_model(pixel_values=pixel_values.to(device, dtype)).last_hidden_state  # (N, 1+P, Dv)
        text = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(device)
        text_tokens = self.text_encoder(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=device),
        ).last_hidden_state  # (N, 35, Dt)
        reward = self.head(text_tokens[:, 0].float())  # the [CLS] token
        return ((reward - REWARD_MEAN) / REWARD_STD).cpu()
