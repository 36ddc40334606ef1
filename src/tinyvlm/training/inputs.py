"""What a training run reads: its ``--data`` sources mixed into one stream, and its held-out samples.

A JSONL / JSON file is read, checked and encoded whole before anything trains (every bad record reported at
once); a dataset source (parquet, save_to_disk, ``hf-dataset:``) is read as a stream and its rows are
encoded in the loader's workers. See `tinyvlm.data.stream` for the order and the data position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tinyvlm.data.records import Record, encode_records, read_records, split_records
from tinyvlm.data.schemas import RatingFilter, check_filters
from tinyvlm.data.readers import SourceSpec, open_rows, parse_source
from tinyvlm.data.stream import Item, Mixture, RecordSource, RowSource, Source, StepBatches, held_out_rows, stable_seed
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.training.config import TrainConfig

#: A held-out sample: the record (its prompt is answered, its last answer is the reference) and the item
#: the loader makes its loss batch from.
Held = tuple[Record, Item]


@dataclass
class TrainingData:
    mixture: Mixture
    batches: StepBatches
    #: The held-out samples, at most ``val_rows``, in a fixed order.
    held_out: list[Held]
    max_steps: int


@dataclass
class OpenedData:
    """The sources opened and checked (files read, dataset layouts recognised), before any model exists."""

    #: Per ``--data`` source: a records file's training records, or a dataset's `RowSource`.
    sources: list[list[Record] | RowSource]
    #: The held-out samples' origins: one per ``--data`` source, or ``--val-data`` alone. A records file's
    #: list (encoded up front), a dataset's records as they are read.
    held_out: list[list[Record] | Iterator[Record]]


def open_data(config: TrainConfig) -> OpenedData:
    """Open every source: records files are read and checked whole, datasets opened and their layout
    recognised, so that bad data stops the run before a model is built or downloaded."""
    ratings = RatingFilter(**config.ratings)
    own_val = config.val_data is None
    sources: list[list[Record] | RowSource] = []
    held: list[list[Record] | Iterator[Record]] = []
    for index, text in enumerate(config.data):
        spec = parse_source(text)
        if spec.is_records_file:
            _records_file_checks(spec, config.data_split)
            records = read_records(spec.path)  # type: ignore[arg-type]
            train, val = split_records(records, config.val_fraction, config.seed) if own_val else (records, [])
            sources.append(train)
            held.append(val)
        else:
            rows = open_rows(spec, config.data_split)
            sources.append(RowSource(rows, seed=config.seed, index=index, block=config.shuffle_block,
                                     val_fraction=config.val_fraction if own_val else 0.0, ratings=ratings))
            held.append(held_out_rows(rows, seed=config.seed, val_fraction=config.val_fraction, ratings=ratings,
                                      limit=config.val_rows))
    check_filters({str(s.name): s.rows.columns for s in sources if isinstance(s, RowSource)}
                  | {text: [] for text, s in zip(config.data, sources) if not isinstance(s, RowSource)}, ratings)
    if not own_val:
        spec, split = parse_source(config.val_data), config.val_split or config.data_split  # type: ignore[arg-type]
        if spec.is_records_file:
            _records_file_checks(spec, split)
            held = [read_records(spec.path)[: config.val_rows]]  # type: ignore[arg-type]
        else:
            held = [held_out_rows(open_rows(spec, split), seed=config.seed, val_fraction=None, ratings=ratings,
                                  limit=config.val_rows)]
    return OpenedData(sources, held)


def prepare_data(
    opened: OpenedData, config: TrainConfig, processor, *, max_length: int, batch_size: int, grad_accum: int,
    world_size: int, rank: int,
) -> TrainingData:
    """Encode the records files' examples, build the mixture and this process's step batches, and collect
    the held-out samples."""
    encode = dict(encode=processor.encode_example, max_length=max_length,
                  needs_image_sizes=processor.tokens.split_images)
    sources: list[Source] = [
        source if isinstance(source, RowSource)
        else RecordSource(text, encode_records(source, **encode), seed=config.seed, index=index)
        for index, (text, source) in enumerate(zip(config.data, opened.sources))
    ]
    held: list[Iterator[Held]] = [
        iter(list(zip(origin, encode_records(origin, **encode)))) if isinstance(origin, list)
        else ((record, record) for record in origin)
        for origin in opened.held_out
    ]
    mixture = Mixture(sources, config.data_weights, seed=config.seed)
    batches = StepBatches(mixture, micro_batch=batch_size, world_size=world_size, rank=rank, accumulation=grad_accum)
    if config.max_steps is not None:
        max_steps = config.max_steps
    elif mixture.length is not None:
        max_steps = max(1, math.ceil(mixture.length / batches.global_batch))
    else:
        unknown = ", ".join(s.name for s in sources if s.length is None)
        raise ConfigError(f"the number of rows of {unknown} is not known before reading it: give --max-steps")
    weights = mixture.weights if config.val_data is None else [1.0]
    return TrainingData(mixture, batches, interleave(held, weights, seed=config.seed, limit=config.val_rows), max_steps)


def _records_file_checks(spec: SourceSpec, split: str) -> None:
    if split != "train":
        raise DataError(f"{spec.text} is one file, read as split 'train': it has no split {split!r}")


def interleave(streams: Sequence[Iterator[Held]], weights: Sequence[float], *, seed: int, limit: int) -> list[Held]:
    """Up to ``limit`` samples drawn from ``streams`` by ``weights`` (seeded), until every stream is used up."""
    live = list(range(len(streams)))
    generator = np.random.default_rng(stable_seed("held-out mix", seed))
    out: list[Held] = []
    while live and len(out) < limit:
        probabilities = np.array([weights[i] for i in live])
        pick = live[int(generator.choice(len(live), p=probabilities / probabilities.sum()))] if len(live) > 1 else live[0]
        sample = next(streams[pick], None)
        if sample is None:
            live.remove(pick)
        else:
            out.append(sample)
    return out
