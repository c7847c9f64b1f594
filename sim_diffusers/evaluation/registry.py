"""`get_scorer(name, path, device, dtype)`: one entry point for every metric."""

from __future__ import annotations

import importlib

import torch

from .base import Scorer

# name -> (module, class); modules are imported on demand so that FID's torchmetrics stays optional.
SCORERS = {
    "aesthetic": ("aesthetic", "AestheticScorer"),
    "imagereward": ("imagereward", "ImageRewardScorer"),
    "pickscore": ("pickscore", "PickScoreScorer"),
    "clip_score": ("clip_score", "CLIPScoreScorer"),
    "fid": ("fid", "FIDScorer"),
}


def scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise ValueError(f"Unknown metric {name!r}; choose from {', '.join(SCORERS)}.")
    module, cls = SCORERS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def get_scorer(name: str, path=None, device="cpu", dtype=torch.float32, **options) -> Scorer:
    """Load the scorer `name` from `path` (Hub id or local; None: the metric's default weights).

    `options` go to the scorer's `from_pretrained`: `clip_model` (aesthetic), `processor` (pickscore, clip_score),
    `tokenizer` (imagereward), `reference` and `batch_size` (fid).
    """
    cls = scorer_class(name)
    if path is None:
        return cls.from_pretrained(device=device, dtype=dtype, **options)
    return cls.from_pretrained(path, device=device, dtype=dtype, **options)
