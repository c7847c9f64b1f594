"""Metrics of the SIM paper's comparison: aesthetic score, ImageReward, PickScore, plus CLIP score and FID.

Every scorer loads real weights from a Hub id or a local path and maps (list of PIL images, prompts) to one score per
image (FID: one number per image set). `examples/evaluate.py` runs them on generated images and writes a report.
"""

from .base import RewardHead, Scorer, summarize
from .registry import SCORERS, get_scorer, scorer_class

__all__ = ["SCORERS", "RewardHead", "Scorer", "get_scorer", "scorer_class", "summarize"]
