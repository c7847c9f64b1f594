"""Content fingerprints of a teacher and a caption list, and cheap readability checks of safetensors files.

A checkpoint records the fingerprints of the teacher and captions it was trained on, and the T5 embedding cache the
fingerprint of the text encoder it was built with; a resume or a cache reuse compares them. They must follow the
*content*, not the path (the same teacher by a relative or an absolute path, or copied elsewhere, is the same
teacher; a teacher changed in place is not), and cost little on every start, without hashing gigabytes:

- a local folder: every file of the components the run uses, by relative path and size; small files (configs, the
  tokenizer) hashed whole; a weight file by its safetensors header (names, dtypes, shapes) and 64 blocks of 64 KiB
  spread over its data, so re-trained weights of the same shapes differ. A change confined to bytes between the
  sampled blocks goes unseen: the price of not reading every byte on every start.
- a Hub id: the commit its revision resolves to (the snapshot folder of the local Hub cache), which names the
  content exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

WHOLE_FILE_LIMIT = 16 * 2**20  # files up to this size are hashed whole
SAMPLED_BLOCKS = 64
BLOCK_SIZE = 64 * 2**10
TEACHER_COMPONENTS = ("transformer", "vae", "scheduler", "tokenizer", "text_encoder")
TEXT_COMPONENTS = ("tokenizer", "text_encoder")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class UnreadableFile(ValueError):
    """A weights file that cannot be what it claims to be (truncated, wrong header); the message says why."""


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a truncated or padded file, or one
    that is not safetensors at all, raises UnreadableFile)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UnreadableFile(f"{path.name} is {size} bytes, too short for a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, 100 * 2**20):
            raise UnreadableFile(f"{path.name} is not a safetensors file (header size {header_size})")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UnreadableFile(f"{path.name} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise UnreadableFile(f"{path.name} has an unreadable safetensors header")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        state = "truncated" if size < expected else "longer than its header says"
        raise UnreadableFile(f"{path.name} is {state} ({size} bytes, its header describes {expected})")
    return header


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            digest.update(f.read())
            return
        start = 0
        if path.suffix == ".safetensors":
            (header_size,) = struct.unpack("<Q", f.read(8))
            start = 8 + header_size
            f.seek(0)
            digest.update(f.read(start))
        span = max(size - start - BLOCK_SIZE, 0)
        for k in range(SAMPLED_BLOCKS):
            f.seek(start + span * k // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(BLOCK_SIZE))


def folder_fingerprint(root: str | os.PathLike, components, model_index: dict) -> str:
    """sha256 over the model_index entries of `components` and every file in their folders (hidden files, e.g. a
    download tool's .cache, left out)."""
    root = Path(root)
    digest = hashlib.sha256()
    digest.update(json.dumps({name: model_index.get(name) for name in components}, sort_keys=True).encode())
    for name in components:
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                digest.update(f"{relative.as_posix()}\0".encode())
                _file_digest(path, digest)
    return digest.hexdigest()


def teacher_fingerprints(name_or_path: str, revision: str | None, variant: str | None, snapshot: str | None) -> dict:
    """{"teacher": ..., "text_encoder": ...}: the whole teacher's fingerprint, and its tokenizer and T5's alone (what
    the embedding cache depends on). `snapshot`: for a Hub id, the local folder its model_index.json was read from."""
    root = Path(name_or_path)
    suffix = f" variant {variant}" if variant else ""  # which weight files of a folder are loaded
    if root.is_dir():
        model_index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        whole = folder_fingerprint(root, TEACHER_COMPONENTS, model_index)
        text = folder_fingerprint(root, TEXT_COMPONENTS, model_index)
        return {"teacher": f"sha256:{whole}{suffix}", "text_encoder": f"sha256:{text}{suffix}"}
    commit = Path(snapshot).name if snapshot and _COMMIT.match(Path(snapshot).name) else revision or "main"
    hub = f"hub:{name_or_path}@{commit}{suffix}"
    return {"teacher": hub, "text_encoder": hub}


def captions_fingerprint(captions: list[str]) -> str:
    """sha256 of the caption list in order (the caption stream's order depends on it)."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    return f"sha256:{digest.hexdigest()}"
