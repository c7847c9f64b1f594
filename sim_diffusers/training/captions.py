"""Captions for data-free distillation: loading from files or `datasets`, cleaning, and a deterministic stream.

SIM needs no images: each training sample is a caption, a noise z and a few random timesteps. Everything random about
sample i of step s is drawn from a generator seeded by (seed, s, i), where i is the sample's index in the *global*
batch. So the data and noise of a run do not depend on how the global batch is split over processes, and resuming at
step s needs nothing but s: the caption stream's position is the step counter.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CAPTION_FILE_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".parquet")


class UserInputError(ValueError):
    """A problem with what the user gave (arguments, files). The trainer prints its message as one line and exits."""


@dataclass
class CaptionSet:
    captions: list[str]
    num_skipped_non_utf8: int = 0
    num_dropped_empty: int = 0


def _decode_lines(raw: bytes) -> tuple[list[str], int]:
    """Split bytes into lines, decoding each as UTF-8; lines that are not valid UTF-8 are skipped and counted."""
    lines, bad = [], 0
    for chunk in raw.splitlines():
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines, bad


def _column(rows: list[dict], column: str | None, path: Path) -> list:
    columns = list(rows[0].keys()) if rows else []
    if column is None:
        raise UserInputError(f"{path.name} has columns {columns}: choose one with --caption_column.")
    if column not in columns:
        raise UserInputError(f"--caption_column {column!r} is not in {path.name}; its columns are {columns}.")
    return [row.get(column) for row in rows]


def read_caption_file(path: str | Path, caption_column: str | None = None) -> CaptionSet:
    """Captions from .txt (one per line), .csv, .jsonl, .json (a list of objects) or .parquet (`caption_column`).

    Lines or records that are not valid UTF-8 are skipped and counted (not fatal); captions are stripped and empty
    ones dropped. Raises UserInputError for a missing, unreadable or empty file, or a column that does not exist.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserInputError(f"--caption_file {path} is a broken link to {path.readlink()}.")
    if not path.exists():
        raise UserInputError(f"--caption_file {path} does not exist.")
    if path.is_dir():
        raise UserInputError(f"--caption_file {path} is a directory, not a file.")
    suffix = path.suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise UserInputError(f"--caption_file {path} must end in one of {', '.join(CAPTION_FILE_SUFFIXES)}.")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserInputError(f"--caption_file {path} cannot be read: {err.strerror or err}.") from None
    if not raw.strip():
        raise UserInputError(f"--caption_file {path} is empty.")

    bad = 0
    if suffix == ".txt":
        values, bad = _decode_lines(raw)
    elif suffix == ".csv":
        lines, bad = _decode_lines(raw)
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        values = _column(rows, caption_column, path)
    elif suffix == ".jsonl":
        lines, bad = _decode_lines(raw)
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserInputError(f"{path.name} line {number} is not valid JSON.") from None
        values = _column(rows, caption_column, path)
    elif suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserInputError(f"{path.name} is not valid UTF-8 JSON: {err}.") from None
        if isinstance(data, list) and all(isinstance(item, str) for item in data):
            values = data
        elif isinstance(data, list) and all(isinstance(item, dict) for item in data):
            values = _column(data, caption_column, path)
        else:
            raise UserInputError(f"{path.name} must hold a list of strings or a list of objects.")
    else:  # .parquet
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any reader error is a bad file to the user
            raise UserInputError(f"{path.name} is not a readable parquet file: {err}.") from None
        if caption_column is None or caption_column not in table.column_names:
            raise UserInputError(
                f"--caption_column {caption_column!r} is not in {path.name}; its columns are {table.column_names}."
            )
        values = table.column(caption_column).to_pylist()
    return clean_captions(values, num_skipped_non_utf8=bad, source=str(path))


def load_dataset_captions(
    dataset_name: str,
    dataset_config_name: str | None,
    caption_column: str | None,
    split: str = "train",
    cache_dir=None,
) -> CaptionSet:
    """Captions from a `datasets` dataset (Hub id or local folder); only the caption column is kept."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - surfaced as one line
        raise UserInputError(
            f"--dataset_name {dataset_name}: cannot be loaded ({type(err).__name__}: {err})."
        ) from None
    if caption_column is None or caption_column not in dataset.column_names:
        raise UserInputError(
            f"--caption_column {caption_column!r} is not in {dataset_name}; its columns are {dataset.column_names}."
        )
    return clean_captions(dataset[caption_column], source=dataset_name)


def clean_captions(values, num_skipped_non_utf8: int = 0, source: str = "captions") -> CaptionSet:
    captions = [value.strip() for value in values if isinstance(value, str) and value.strip()]
    dropped = len(values) - len(captions)
    if not captions:
        skipped = f"; {num_skipped_non_utf8} line(s) skipped as not valid UTF-8" if num_skipped_non_utf8 else ""
        raise UserInputError(f"{source} holds no captions after cleaning ({len(values)} entries, all empty{skipped}).")
    if num_skipped_non_utf8:
        logger.warning("Skipped %d line(s) of %s that are not valid UTF-8.", num_skipped_non_utf8, source)
    return CaptionSet(captions, num_skipped_non_utf8, dropped)


# ---------------------------------------------------------------------------------------------------------------------
# The caption stream and per-sample randomness.


@dataclass
class SampleRandomness:
    """Everything random about a batch of samples, drawn per sample from (seed, step, global index)."""

    noise: torch.Tensor  # z ~ N(0, I) of the generator, (B, C, h, w)
    fake_timesteps: torch.Tensor  # (B,) t for the fake-score update
    fake_noise: torch.Tensor  # (B, C, h, w) eps of that update's x_t
    generator_timesteps: torch.Tensor  # (B,) t for the generator update
    generator_noise: torch.Tensor  # (B, C, h, w) eps of the generator update's x_t
    # A K-step generator only (K > 1): which of its K calls the step trains (0-based, the same for every sample of the
    # step; backward simulation runs the calls before it without gradients), and each sample's fresh noise of calls
    # 2 .. K
    generator_step: torch.Tensor | None = None  # (B,) in [0, K)
    fresh_noise: torch.Tensor | None = None  # (B, K - 1, C, h, w)

    def to(self, device) -> SampleRandomness:
        values = (getattr(self, f.name) for f in fields(self))
        return SampleRandomness(*(None if v is None else v.to(device) for v in values))


class CaptionStream:
    """Deterministic captions and randomness for step s, split over processes.

    Step s consumes global samples [s * G, (s + 1) * G), G = per-device batch x processes x accumulation steps, from
    a new random permutation of the captions each epoch. Process r of R at micro-step m takes its slice of the
    global batch, so one process with batch 4 and two with batch 2 see the same samples.
    """

    def __init__(
        self, captions: list[str], seed: int, global_batch_size: int, t_min: int, t_max: int, generator_steps: int = 1
    ):
        self.captions = captions
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.t_min, self.t_max = t_min, t_max
        self.generator_steps = generator_steps
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch, 0xCA])
            self._permutations[epoch] = rng.permutation(len(self.captions))
        return self._permutations[epoch]

    def caption_at(self, position: int) -> str:
        epoch, offset = divmod(position, len(self.captions))
        return self.captions[int(self._permutation(epoch)[offset])]

    def local_positions(self, step: int, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        start = step * self.global_batch_size + (micro_step * world_size + rank) * batch_size
        return list(range(start, start + batch_size))

    def batch(
        self, step: int, micro_step: int, batch_size: int, rank: int, world_size: int, latent_shape: tuple[int, ...]
    ) -> tuple[list[str], SampleRandomness]:
        positions = self.local_positions(step, micro_step, batch_size, rank, world_size)
        captions = [self.caption_at(p) for p in positions]
        draws = [self._draw(p, latent_shape) for p in positions]
        stacked = [torch.stack(parts) for parts in zip(*draws)]
        randomness = SampleRandomness(*stacked[:5])
        if self.generator_steps > 1:
            randomness.generator_step = torch.full((len(positions),), self.generator_step(step), dtype=torch.long)
            randomness.fresh_noise = stacked[5]
        return captions, randomness

    def generator_step(self, step: int) -> int:
        """The call of a K-step generator that step `step` trains, drawn from (seed, step): every process of the
        step draws the same, so all make the same number of generator calls (a sharded network's forward is a
        collective), whatever the world size."""
        return int(np.random.default_rng([self.seed, step, 0x57E9]).integers(self.generator_steps))

    def _draw(self, position: int, latent_shape):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0]))
        noise = torch.randn(latent_shape, generator=g)
        fake_t = torch.randint(self.t_min, self.t_max + 1, (), generator=g)
        fake_noise = torch.randn(latent_shape, generator=g)
        gen_t = torch.randint(self.t_min, self.t_max + 1, (), generator=g)
        gen_noise = torch.randn(latent_shape, generator=g)
        if self.generator_steps == 1:  # the one-step generator's draws, unchanged
            return noise, fake_t, fake_noise, gen_t, gen_noise
        # Drawn after the others, so that the draws above are the same whatever the number of generator steps
        fresh_noise = torch.randn((self.generator_steps - 1, *latent_shape), generator=g)
        return noise, fake_t, fake_noise, gen_t, gen_noise, fresh_noise
