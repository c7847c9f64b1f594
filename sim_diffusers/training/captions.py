"""Captions for data-free distillation: loading from files or `datasets`, cleaning, and a deterministic stream.

SIM needs no images: each training sample is a caption, a noise z and a few random timesteps. Everything random about
sample i of step s is drawn from a generator seeded by (seed, s, i), where i is the sample's index in the *global*
batch. So the data and noise of a run do not depend on how the global batch is split over processes, and resuming at
step s needs nothing but s: the caption stream's position is the step counter.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CAPTION_FILE_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".parquet")


class UserInputError(ValueError):
    """A problem with what the user gave (arguments, files). The trainer prints its message as one line and exits."""


@dataclass
class CaptionSet:
    """The captions a run trains on, in file order, and what was left out of the source, by kind: {kind: count}."""

    captions: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    @functools.cached_property
    def fingerprint(self) -> str:
        from .fingerprints import captions_fingerprint

        return captions_fingerprint(self.captions)


# Byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # as bytes.splitlines: no splitting at U+2028 and the like inside a caption
NOT_UTF8 = "not valid UTF-8"


def _decode(raw: bytes, path: Path) -> tuple[list[str], int]:
    """(the file's lines, the number of lines skipped as not UTF-8). UTF-16 and UTF-32 files are recognised by
    their byte-order mark and decoded whole; a file with NUL bytes is refused (UTF-16 without a mark, or binary)."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            body = raw[len(bom) :]
            break
    else:
        body, codec = raw, "utf-8"
    if codec == "utf-8":
        if b"\0" in body:
            line = body[: body.index(b"\0")].count(b"\n") + 1
            raise UserInputError(
                f"--caption_file {path} has NUL bytes (line {line}): it is not UTF-8 text (UTF-16 without a "
                "byte-order mark?); save it as UTF-8."
            )
        lines, bad = [], 0
        for chunk in body.splitlines():
            try:
                lines.append(chunk.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
        return lines, bad
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as err:
        raise UserInputError(
            f"--caption_file {path} starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} "
            f"(byte {err.start + len(bom)})."
        ) from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise UserInputError(f"--caption_file {path} has NUL characters (line {line}); they cannot be in a caption.")
    return _LINE_BREAK.split(text.removesuffix("\n")), 0


def _column(rows: list[dict], column: str | None, path: Path) -> list:
    columns = list(rows[0].keys()) if rows else []
    if column is None:
        raise UserInputError(f"{path.name} has columns {columns}: choose one with --caption_column.")
    if column not in columns:
        raise UserInputError(f"--caption_column {column!r} is not in {path.name}; its columns are {columns}.")
    return [row.get(column) for row in rows]


def _csv_rows(lines: list[str], path: Path) -> list[dict]:
    """Rows of a CSV file; a quote left open or a row with more or fewer fields than the header is refused (a quote
    left open would swallow every following row into one caption; an unquoted comma would cut a caption short)."""
    reader = csv.reader(io.StringIO("\n".join(lines)), strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise UserInputError(f"{path.name} has no header row.")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserInputError(
                    f"{path.name} line {reader.line_num} has {len(row)} fields, its header {len(header)} (a caption "
                    "with a comma must be quoted)."
                )
            rows.append(dict(zip(header, row)))
    except csv.Error as err:
        raise UserInputError(
            f"{path.name} is not valid CSV near line {reader.line_num}: {err} (a quote left open?)."
        ) from None
    return rows


def read_caption_file(path: str | Path, caption_column: str | None = None) -> CaptionSet:
    """Captions from .txt (one per line), .csv, .jsonl, .json (a list of objects) or .parquet (`caption_column`).

    UTF-8 (with or without a byte-order mark), or UTF-16 / UTF-32 with one. Lines of a UTF-8 file that are not valid
    UTF-8 are skipped and counted; everything else left out is counted by kind (`clean_captions`). Raises
    UserInputError for a missing, unreadable, empty or malformed file, or a column that does not exist.
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
        values, bad = _decode(raw, path)
    elif suffix == ".csv":
        lines, bad = _decode(raw, path)
        values = _column(_csv_rows(lines, path), caption_column, path)
    elif suffix == ".jsonl":
        lines, bad = _decode(raw, path)
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserInputError(f"{path.name} line {number} is not valid JSON.") from None
        if not all(isinstance(row, dict) for row in rows):
            raise UserInputError(f"{path.name} must hold one JSON object per line.")
        values = _column(rows, caption_column, path)
    elif suffix == ".json":
        lines, bad = _decode(raw, path)
        if bad:
            raise UserInputError(f"{path.name} is not valid UTF-8 JSON ({bad} line(s) are not UTF-8).")
        try:
            data = json.loads("\n".join(lines))
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path.name} is not valid JSON: {err}.") from None
        if isinstance(data, list) and all(isinstance(item, dict) for item in data) and data:
            values = _column(data, caption_column, path)
        elif isinstance(data, list):
            values = data
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
    return clean_captions(values, num_skipped_non_utf8=bad, source=str(path), column=caption_column)


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
    return clean_captions(dataset[caption_column], source=dataset_name, column=caption_column)


def _visible(text: str) -> bool:
    """Whether `text` has a character a tokenizer can see (not whitespace, a control or a format character such as a
    zero-width space or joiner)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


def _kind_of(value) -> str | None:
    """Why a value is not a caption, or None when it is one."""
    if value is None:
        return "null"
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if not value.strip():
        return "empty"
    if not _visible(value):
        return "invisible characters only"
    return None


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def clean_captions(values, num_skipped_non_utf8: int = 0, source: str = "captions", column=None) -> CaptionSet:
    """Stripped captions; every value left out is counted by kind and reported in one warning. Refused: nothing left,
    or a column that holds mostly numbers (the wrong --caption_column, most likely)."""
    captions, dropped = [], {}
    if num_skipped_non_utf8:
        dropped[NOT_UTF8] = num_skipped_non_utf8
    for value in values:
        kind = _kind_of(value)
        if kind is None:
            captions.append(value.strip())
        else:
            dropped[kind] = dropped.get(kind, 0) + 1
    total = len(values) + num_skipped_non_utf8
    where = f"{source}" + (f" (column {column!r})" if column else "")
    if not captions:
        detail = ", ".join(f"{n} {kind}" for kind, n in dropped.items())
        raise UserInputError(f"{where} holds no captions after cleaning ({total} entries: {detail}).")
    numbers = sum(n for kind, n in dropped.items() if kind in ("not text (int)", "not text (float)"))
    numbers += sum(1 for caption in captions if _NUMBER.fullmatch(caption))
    if 2 * numbers > total:
        raise UserInputError(
            f"{where} holds numbers in {numbers} of its {total} entries, captions in {total - numbers}: is it the "
            "caption column?"
        )
    if dropped:
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items(), key=lambda item: -item[1]))
        logger.warning(
            "%s: left out %d of %d entries (%s); training on %d.",
            where,
            total - len(captions),
            total,
            detail,
            len(captions),
        )
    return CaptionSet(captions, dropped)


def long_captions(captions: list[str], tokenizer, max_sequence_length: int, sample: int = 20000) -> tuple[int, int]:
    """(captions in an evenly spaced sample of at most `sample` that T5 would cut at `max_sequence_length` tokens,
    the sample's size). Only captions long enough in characters to be cut are tokenised (a token is at least one
    character)."""
    unique = list(dict.fromkeys(captions))
    step = max(1, len(unique) // sample)
    sampled = unique[::step][:sample]
    candidates = [c for c in sampled if len(c) + 1 > max_sequence_length]
    if not candidates:
        return 0, len(sampled)
    lengths = [len(ids) for ids in tokenizer(candidates, add_special_tokens=True)["input_ids"]]
    return sum(n > max_sequence_length for n in lengths), len(sampled)


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
