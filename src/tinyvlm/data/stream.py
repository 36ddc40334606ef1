"""The order training reads its samples in: one global stream, the same in every process and after a resume.

Training reads the *positions* 0, 1, 2, ... of one stream; optimizer step ``s`` takes positions
``[s * G, (s + 1) * G)`` with ``G = micro_batch * world_size * accumulation``, and micro-batch ``j`` of rank
``r`` takes the slice ``[(j * world_size + r) * micro_batch, ...)`` of them (`StepBatches`). One process with
batch 2B therefore sees the samples of two processes with batch B. Every process reads the whole stream, so
that the order never depends on the number of processes, and keeps its own slices: rows are cheap to read
(their images stay encoded); decoding and preprocessing happen in the loader, for this process's samples only.

Position ``p`` is drawn from one of the sources (`Mixture`; with several sources a seeded draw by their
weights, a pure function of ``p``), and each source hands out its rows in its own order:

* a JSONL / JSON file (`RecordSource`): a seeded permutation of its examples per epoch;
* a dataset (`RowSource`): its stored order, cut into blocks of ``shuffle_block`` rows, each block shuffled
  by a seeded permutation (a shuffle buffer whose state is just the block's start), again every epoch.

A seeded fraction of rows is held out for evaluation: exactly `split_records`'s for a file (at least one
record), and for a dataset each row by a hash of the seed, the source and the row's index (so the same rows
in every epoch); when that picks no row of a dataset whose length is known, the row of the smallest hash is
held out, so that a hold-out asked for is never empty (`HoldOut`).

`Mixture.state` is the data position: per source the epoch, the block, where that block starts in the
files (the ``datasets`` iterator state, so a resume re-reads one block, not the stream) and how many of its
rows were handed out; plus the counts of skipped rows and dropped turns. It goes into every checkpoint.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from tinyvlm.data.records import Example, Record
from tinyvlm.data.schemas import RatingFilter, detect_schema
from tinyvlm.data.readers import RowReader, Rows
from tinyvlm.errors import DataError

#: What the stream hands to the loader: a pre-encoded example (JSONL / JSON files) or a record to encode.
Item = Union[Example, Record]
#: Positions drawn per chunk of the mixture's seeded source choices.
CHOICE_CHUNK = 4096


def stable_unit(*key: Any) -> float:
    """A number in [0, 1) that is a pure function of ``key`` (the same in every process and run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def stable_seed(*key: Any) -> int:
    return int(stable_unit(*key) * 2**63)


def held_out(seed: int, source: str, index: int, val_fraction: float) -> bool:
    """Whether the hash rule holds out row ``index`` of the source identified by ``source`` (`Rows.identity`)."""
    return val_fraction > 0 and stable_unit("held-out", seed, source, index) < val_fraction


class HoldOut:
    """The held-out rows of a dataset: those `held_out` picks, and, when it picks none of the rows of a dataset
    whose length is known (two rows or more), the one of smallest hash (a small file, e.g. 32 rows at 5 %, otherwise
    holds out nothing about one time in five). Finding out reads no row: it hashes indices until the first
    held-out one, about ``1 / fraction`` of them, so datasets that have held-out rows keep exactly those."""

    def __init__(self, rows: Rows, *, seed: int, fraction: float):
        self.seed, self.source, self.fraction = seed, rows.identity, fraction
        # (never the only row: a dataset of one row trains on it)
        self.fallback = _smallest_hash_row(seed, self.source, fraction, rows.length) if (rows.length or 0) > 1 else None

    def __contains__(self, index: int) -> bool:
        return held_out(self.seed, self.source, index, self.fraction) or index == self.fallback


def _smallest_hash_row(seed: int, source: str, fraction: float, length: int) -> int | None:
    """None when the hash rule holds out one of the ``length`` rows (or ``fraction`` is 0), else the row of
    smallest hash."""
    if fraction <= 0:
        return None
    smallest, chosen = 1.0, 0
    for index in range(length):
        unit = stable_unit("held-out", seed, source, index)
        if unit < fraction:
            return None
        if unit < smallest:
            smallest, chosen = unit, index
    return chosen


class Counts:
    """Rows the training stream skipped, and turns the rating filters dropped."""

    KEYS = ("filtered_rows", "dropped_turns")

    def __init__(self, values: dict[str, int] | None = None):
        self.values = {key: int((values or {}).get(key, 0)) for key in self.KEYS}

    def add(self, key: str, count: int = 1) -> None:
        self.values[key] += count


# ------------------------------------------------------------------------------------------------ sources


class RecordSource:
    """The examples of a JSONL / JSON file, in a seeded permutation per epoch (source ``index`` permutes with
    the seed ``seed + epoch + index * 2**32``)."""

    def __init__(self, name: str, examples: Sequence[Example], *, seed: int, index: int):
        if not examples:
            raise DataError(f"{name}: no training examples")
        self.name, self.examples, self.seed, self.index = name, list(examples), seed, index
        self.length: int | None = len(self.examples)
        self.epoch, self.offset = 0, 0
        self._order: list[int] = []
        self._order_epoch = -1

    def next(self, counts: Counts) -> Item:
        if self.offset == len(self.examples):
            self.epoch, self.offset = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch + self.index * 2**32)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._order_epoch = self.epoch
        item = self.examples[self._order[self.offset]]
        self.offset += 1
        return item

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class RowSource:
    """The training rows of a dataset: its stored order, shuffled block by block, held-out rows left out,
    rows turned into records by their schema (rows whose every turn the rating filters drop are skipped)."""

    def __init__(self, rows: Rows, *, seed: int, index: int, block: int, val_fraction: float, ratings: RatingFilter):
        self.rows, self.seed, self.index, self.block_size = rows, seed, index, block
        self.ratings = ratings
        self.held_out = HoldOut(rows, seed=seed, fraction=val_fraction)
        self.schema = detect_schema(rows.columns, source=rows.name)
        self.name = rows.name
        #: Training rows (about: held-out rows are drawn per row), None when the dataset does not say.
        self.length = None if rows.length is None else max(1, round(rows.length * (1 - val_fraction)))
        # The position: block ``block`` of epoch ``epoch`` starts at row ``first_index``, at ``block_start`` in
        # the files (None: the beginning); ``taken`` of its rows were handed out.
        self.epoch, self.block, self.block_start, self.first_index, self.taken = 0, 0, None, 0, 0
        self._usable_this_epoch = False
        self._reader: RowReader | None = None
        self._pending: list[tuple[int, dict[str, Any]]] | None = None  # the block's rows still to hand out, reversed
        self._block_rows = 0
        self._next_start: dict[str, Any] | None = None

    def _load_block(self) -> bool:
        """Read block ``block`` and drop the ``taken`` rows already handed out; False at the end of the epoch."""
        if self._reader is None:
            self._reader = self.rows.read(self.block_start)
        chunk = list(islice(self._reader, self.block_size))
        if not chunk:
            return False
        self._next_start = self._reader.state()
        self._block_rows = len(chunk)
        indices = range(self.first_index, self.first_index + len(chunk))
        kept = [(i, row) for i, row in zip(indices, chunk) if i not in self.held_out]
        order = np.random.default_rng(stable_seed("block", self.seed, self.index, self.epoch, self.block)).permutation(len(kept))
        self._pending = [kept[k] for k in order][self.taken :][::-1]
        return True

    def next(self, counts: Counts) -> Item:
        while True:
            if self._pending is None and not self._load_block():
                if not self._usable_this_epoch:
                    raise DataError(f"{self.name}: no usable training rows (all held out, or every turn dropped "
                                    "by the rating filters)")
                self.epoch, self.block, self.block_start, self.first_index, self.taken = self.epoch + 1, 0, None, 0, 0
                self._usable_this_epoch, self._reader = False, None
                continue
            assert self._pending is not None
            if not self._pending:  # the block is used up: the next one starts where this one ended
                self.first_index += self._block_rows
                self.block, self.block_start, self.taken, self._pending = self.block + 1, self._next_start, 0, None
                continue
            index, row = self._pending.pop()
            self.taken += 1
            converted = self.schema.convert(row, where=self.rows.where(index), base=self.rows.base, ratings=self.ratings)
            counts.add("dropped_turns", converted.dropped_turns)
            if converted.record is None:
                counts.add("filtered_rows")
                continue
            self._usable_this_epoch = True
            return converted.record

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "block": self.block, "block_start": self.block_start,
                "first_index": self.first_index, "taken": self.taken, "usable": self._usable_this_epoch}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.block, self.first_index = int(state["epoch"]), int(state["block"]), int(state["first_index"])
        self.block_start, self.taken = state["block_start"], int(state["taken"])
        self._usable_this_epoch = bool(state["usable"])
        self._reader, self._pending = None, None


def held_out_rows(rows: Rows, *, seed: int, val_fraction: float | None, ratings: RatingFilter, limit: int) -> Iterator[Record]:
    """The evaluation records of a dataset in stored order: its held-out rows (``val_fraction`` given), or
    every row (a ``--val-data`` source), at most ``limit``; rows the rating filters empty are left out."""
    schema = detect_schema(rows.columns, source=rows.name)
    chosen = None if val_fraction is None else HoldOut(rows, seed=seed, fraction=val_fraction)
    found = 0
    for index, row in enumerate(rows.read()):
        if found >= limit:
            return
        if chosen is not None and index not in chosen:
            continue
        converted = schema.convert(row, where=rows.where(index), base=rows.base, ratings=ratings)
        if converted.record is not None:
            found += 1
            yield converted.record


# ------------------------------------------------------------------------------------------------ mixing


Source = Union[RecordSource, RowSource]


class Mixture:
    """The global stream: position ``p`` comes from source ``choice(p)`` (drawn by ``weights``, seeded)."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None, *, seed: int):
        if not sources:
            raise DataError("no training data sources")
        self.sources = list(sources)
        total = sum(weights) if weights is not None else len(sources)
        self.weights = [w / total for w in weights] if weights is not None else [1 / len(sources)] * len(sources)
        self.seed = seed
        self.position = 0
        self.counts = Counts()
        self._chunk: tuple[int, np.ndarray] | None = None

    def choice(self, position: int) -> int:
        if len(self.sources) == 1:
            return 0
        number = position // CHOICE_CHUNK
        if self._chunk is None or self._chunk[0] != number:
            generator = np.random.default_rng(stable_seed("mix", self.seed, number))
            self._chunk = (number, generator.choice(len(self.sources), size=CHOICE_CHUNK, p=self.weights))
        return int(self._chunk[1][position % CHOICE_CHUNK])

    def next(self) -> Item:
        item = self.sources[self.choice(self.position)].next(self.counts)
        self.position += 1
        return item

    @property
    def length(self) -> int | None:
        """Training rows over all sources, when every source's is known (about, for datasets)."""
        lengths = [source.length for source in self.sources]
        return None if any(n is None for n in lengths) else sum(lengths)  # type: ignore[misc]

    def epoch(self) -> float | None:
        """Passes over the data: positions read / all sources' training rows (None when a length is unknown)."""
        length = self.length
        return None if length is None else self.position / length

    def state(self) -> dict[str, Any]:
        return {"position": self.position, "sources": [source.state() for source in self.sources],
                "counts": dict(self.counts.values)}

    def restore(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"the saved data position has {len(state['sources'])} sources, the run {len(self.sources)}")
        self.position = int(state["position"])
        for source, saved in zip(self.sources, state["sources"]):
            source.restore(saved)
        self.counts = Counts(state["counts"])


class StepBatches:
    """This process's micro-batches of each optimizer step (see the module docstring), and the data position
    at the start of every step it has read (`state_at`)."""

    def __init__(self, mixture: Mixture, *, micro_batch: int, world_size: int, rank: int, accumulation: int):
        self.mixture = mixture
        self.micro_batch, self.world_size, self.rank, self.accumulation = micro_batch, world_size, rank, accumulation
        self._states: dict[int, dict[str, Any]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation

    def iterate(self, start_step: int, stop_step: int) -> Iterator[list[Item]]:
        """Micro-batches from ``start_step`` (the mixture must stand at its first position) to ``stop_step``."""
        if self.mixture.position != start_step * self.global_batch:
            raise DataError(
                f"the data stream stands at position {self.mixture.position}, not at step {start_step}'s "
                f"{start_step * self.global_batch}"
            )
        self._states[start_step] = self.mixture.state()
        return self._micro_batches(start_step, stop_step)

    def _micro_batches(self, start_step: int, stop_step: int) -> Iterator[list[Item]]:
        for step in range(start_step, stop_step):
            items = [self.mixture.next() for _ in range(self.global_batch)]
            self._states[step + 1] = self.mixture.state()  # recorded before any of this step's batches is used
            for j in range(self.accumulation):
                first = (j * self.world_size + self.rank) * self.micro_batch
                yield items[first : first + self.micro_batch]

    def state_at(self, step: int) -> dict[str, Any]:
        """The data position at the start of ``step`` (which must have been read); older ones are forgotten."""
        state = self._states[step]
        self._states = {s: v for s, v in self._states.items() if s >= step}
        return state
