"""T5 caption embeddings for training: encoded online, or once into a safetensors cache so T5 need not stay resident.

Both paths encode through PixArt-alpha's own `encode_prompt` (same lower-casing / cleaning / 120-token padding as
`SIMOneStepPipeline`), so training, the cache and inference see identical embeddings. The cache stores each caption
unpadded (its attention-mask length); padding positions come back as zeros, which PixArt's cross-attention masks out
exactly (a -10000 bias underflows to weight 0), so cached and online training give the same updates.

Cache layout (`--text_embedding_cache DIR`):
    index.json                     fingerprints (captions; text encoder by content, and settings) and the shard list
    negative.safetensors           the empty-prompt embedding of classifier-free guidance
    shard-00000.safetensors ...    "embeds" (tokens, D) concatenated, "offsets" (n + 1,) int64
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .captions import UserInputError

CACHE_FORMAT_VERSION = 2  # 2: the text encoder fingerprinted by content (1: by its path)
SHARD_SIZE = 4096


class OnlineTextEncoder:
    """Encodes captions with the pipeline's T5 on every call; `pipe` is any pipeline with PixArt's encode_prompt."""

    def __init__(self, pipe, device, dtype, max_sequence_length: int = 120, clean_caption: bool = True):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.max_sequence_length, self.clean_caption = max_sequence_length, clean_caption

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=self.clean_caption,
            max_sequence_length=self.max_sequence_length,
        )
        # Zero the padding, as the cache stores it: the transformer ignores it either way.
        return (embeds * mask[..., None]).to(self.dtype), mask

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prompt embedding PixArtAlphaPipeline uses as its negative prompt, (1, L, D) and (1, L)."""
        return self([""])


def _fingerprint(captions: list[str], settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for caption in captions:
        digest.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def cache_mismatch(cache_dir: str | os.PathLike, captions: list[str], settings: dict, ignore=()) -> str | None:
    """Why the cache in `cache_dir` cannot serve `captions` with `settings` (None when it can, or holds no index yet).
    `ignore`: settings not known yet (the trainer's early check runs before the weight dtype is)."""
    index_path = Path(cache_dir) / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return "its index.json is unreadable"
    if index.get("format_version") != CACHE_FORMAT_VERSION:
        return f"it was built by an older version (format {index.get('format_version')})"
    if index.get("captions") != list(dict.fromkeys(captions)):
        return "it was built for other captions"
    built = index.get("settings", {})
    changed = [key for key in settings if key not in ignore and built.get(key) != settings[key]]
    if changed:
        return "it was built with another " + ", ".join(
            "text encoder (by content)" if key == "text_encoder" else f"{key} ({built.get(key)})" for key in changed
        )
    return None


def _pad(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    dim = rows[0].shape[-1]
    embeds = torch.zeros(len(rows), length, dim, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return embeds, mask


class TextEmbeddingCache:
    """Reads a cache written by `build_text_embedding_cache`; looked up by caption string."""

    def __init__(self, cache_dir: str | os.PathLike, device, dtype):
        self.cache_dir = Path(cache_dir)
        self.index = json.loads((self.cache_dir / "index.json").read_text())
        self.device, self.dtype = device, dtype
        self.length = self.index["max_sequence_length"]
        self._row_of = {caption: i for i, caption in enumerate(self.index["captions"])}
        self._shard_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _shard(self, shard: int):
        if shard not in self._shard_cache:
            if len(self._shard_cache) >= 4:
                self._shard_cache.pop(next(iter(self._shard_cache)))
            path = self.cache_dir / self.index["shards"][shard]
            with safe_open(str(path), framework="pt") as f:
                self._shard_cache[shard] = (f.get_tensor("embeds"), f.get_tensor("offsets"))
        return self._shard_cache[shard]

    def _row(self, caption: str) -> torch.Tensor:
        if caption not in self._row_of:
            raise KeyError(f"caption not in the text-embedding cache: {caption[:80]!r}")
        shard, i = divmod(self._row_of[caption], self.index["shard_size"])
        embeds, offsets = self._shard(shard)
        return embeds[offsets[i] : offsets[i + 1]]

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = _pad([self._row(c) for c in captions], self.length)
        return embeds.to(self.device, self.dtype), mask.to(self.device)

    @staticmethod
    def has_extra(cache_dir, prompts: list[str]) -> bool:
        path = Path(cache_dir) / "extra.safetensors"
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["prompts"]) == list(prompts)

    def extra(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the extra prompts (validation) stored with the cache."""
        if not self.has_extra(self.cache_dir, prompts):
            raise KeyError("these prompts are not in the cache's extra.safetensors")
        with safe_open(str(self.cache_dir / "extra.safetensors"), framework="pt") as f:
            return f.get_tensor("embeds").to(self.device, self.dtype), f.get_tensor("mask").to(self.device)

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.cache_dir / "negative.safetensors"), framework="pt") as f:
            row = f.get_tensor("embeds")
        embeds, mask = _pad([row], self.length)
        return embeds.to(self.device, self.dtype), mask.to(self.device)


def build_text_embedding_cache(
    cache_dir: str | os.PathLike,
    captions: list[str],
    encoder: OnlineTextEncoder | None,
    settings: dict,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
    barrier=lambda: None,
    progress=None,
    extra_prompts: list[str] | None = None,
) -> bool:
    """Encode every unique caption once and write the cache; returns False when a matching cache already exists.

    Shards are split over processes (shard k by rank k mod R) and each is renamed into place only when written, so
    an interrupted build resumes where it stopped. `encoder` may be None when the cache is known to be complete.
    `extra_prompts` (validation prompts) are stored beside it, padded, in extra.safetensors.
    `settings` (the text encoder's content fingerprint, sequence length, cleaning, dtype) goes into the fingerprint:
    a cache built for other captions or another text encoder is refused, never silently reused.
    """
    cache_dir = Path(cache_dir)
    unique = list(dict.fromkeys(captions))
    fingerprint = _fingerprint(unique, settings)
    index_path = cache_dir / "index.json"
    if index_path.exists():
        problem = cache_mismatch(cache_dir, unique, settings)
        if problem is not None:
            raise UserInputError(
                f"--text_embedding_cache {cache_dir} does not match: {problem}; give a new directory."
            )
        if rank == 0:
            _write_extra(cache_dir, encoder, extra_prompts)
        barrier()
        return False
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserInputError(f"--text_embedding_cache {cache_dir} is a file, not a directory.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Shards left by an interrupted build are reused only by a build of the same fingerprint.
    partial = cache_dir / "partial.json"
    if rank == 0 and not partial.exists():
        tmp = cache_dir / ".tmp-partial.json"
        tmp.write_text(json.dumps({"fingerprint": fingerprint}))
        os.replace(tmp, partial)
    barrier()
    if json.loads(partial.read_text()).get("fingerprint") != fingerprint:
        raise UserInputError(
            f"--text_embedding_cache {cache_dir} holds a partial build for other captions, another text encoder or "
            "other settings; give a new directory."
        )
    shard_names = [f"shard-{k:05d}.safetensors" for k in range((len(unique) + SHARD_SIZE - 1) // SHARD_SIZE)]

    for k in range(rank, len(shard_names), world_size):
        final = cache_dir / shard_names[k]
        if final.exists():
            continue
        rows = []
        chunk = unique[k * SHARD_SIZE : (k + 1) * SHARD_SIZE]
        for start in range(0, len(chunk), batch_size):
            embeds, mask = encoder(chunk[start : start + batch_size])
            rows += [e[: int(m.sum())].cpu() for e, m in zip(embeds, mask)]
            if progress is not None:
                progress(len(chunk[start : start + batch_size]))
        offsets = torch.tensor([0] + [r.shape[0] for r in rows]).cumsum(0)
        tmp = final.with_name(f".tmp-{rank}-{final.name}")
        save_file({"embeds": torch.cat(rows).contiguous(), "offsets": offsets}, str(tmp))
        os.replace(tmp, final)
    barrier()

    if rank == 0:
        negative, negative_mask = encoder.negative()
        tmp = cache_dir / ".tmp-negative.safetensors"
        save_file({"embeds": negative[0, : int(negative_mask.sum())].cpu().contiguous()}, str(tmp))
        os.replace(tmp, cache_dir / "negative.safetensors")
        index = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "settings": settings,
            "max_sequence_length": settings["max_sequence_length"],
            "shard_size": SHARD_SIZE,
            "shards": shard_names,
            "captions": unique,
        }
        _write_extra(cache_dir, encoder, extra_prompts)
        tmp = cache_dir / ".tmp-index.json"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
        partial.unlink(missing_ok=True)
    barrier()
    return True


def _write_extra(cache_dir: Path, encoder, prompts) -> None:
    if not prompts or TextEmbeddingCache.has_extra(cache_dir, prompts):
        return
    embeds, mask = encoder(list(prompts))
    tmp = cache_dir / ".tmp-extra.safetensors"
    save_file(
        {"embeds": embeds.cpu().contiguous(), "mask": mask.cpu().contiguous()},
        str(tmp),
        metadata={"prompts": json.dumps(list(prompts))},
    )
    os.replace(tmp, cache_dir / "extra.safetensors")
