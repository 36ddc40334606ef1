"""What a training run reads: its ``--data`` sources mixed into one stream, and its held-out samples.

Every source is checked before a model is built (`tinyvlm.data.checks`). A JSONL / JSON file is read and
encoded whole before anything trains (every bad record reported at once); a dataset source (parquet,
save_to_disk, ``hf-dataset:``) is read as a stream and its rows are encoded in the loader's workers. See
`tinyvlm.data.stream` for the order, the held-out rows and the data position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from tinyvlm.data.checks import check_records, check_rows
from tinyvlm.data.records import Record, encode_records, read_records, split_records
from tinyvlm.data.schemas import RatingFilter, check_filters
from tinyvlm.data.readers import Rows, SourceSpec, open_rows, parse_source
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
    """Open and check every source before a model is built or downloaded (`tinyvlm.data.checks`): records files
    are read and checked whole, local datasets row by row, a Hub dataset's first rows; the images of the first
    rows of each are decoded."""
    data, evaluation, seed = config.data, config.evaluation, config.runtime.seed
    ratings = RatingFilter(**data.min_ratings.model_dump())
    fraction = evaluation.held_out_fraction
    sources: list[list[Record] | RowSource] = []
    held: list[list[Record] | Iterator[Record]] = []
    for index, text in enumerate(data.sources):
        spec = parse_source(text)
        if spec.is_records_file:
            records = _read_records_file(spec, data.split)
            train, val = split_records(records, fraction, seed)
            sources.append(train)
            held.append(val)
        else:
            rows = _open_checked_rows(spec, data.split, ratings)
            sources.append(RowSource(rows, seed=seed, index=index, block=data.shuffle_block, val_fraction=fraction,
                                     ratings=ratings))
            held.append(held_out_rows(rows, seed=seed, val_fraction=fraction, ratings=ratings, limit=evaluation.rows)
                        if fraction > 0 else iter(()))
    check_filters({str(s.name): s.rows.columns for s in sources if isinstance(s, RowSource)}
                  | {text: [] for text, s in zip(data.sources, sources) if not isinstance(s, RowSource)}, ratings)
    if evaluation.data is not None:
        spec, split = parse_source(evaluation.data), evaluation.split or data.split
        if spec.is_records_file:
            held = [_read_records_file(spec, split)[: evaluation.rows]]
        else:
            held = [held_out_rows(_open_checked_rows(spec, split, ratings), seed=seed, val_fraction=None,
                                  ratings=ratings, limit=evaluation.rows)]
    return OpenedData(sources, held)


def _read_records_file(spec: SourceSpec, split: str) -> list[Record]:
    if split != "train":
        raise DataError(f"{spec.text} is one file, read as split 'train': it has no split {split!r}")
    records = read_records(spec.path)  # type: ignore[arg-type]
    check_records(records)
    return records


def _open_checked_rows(spec: SourceSpec, split: str, ratings: RatingFilter) -> Rows:
    rows = open_rows(spec, split)
    check_rows(rows, ratings=ratings, every_row=spec.repo is None)
    return rows


def prepare_data(
    opened: OpenedData, config: TrainConfig, processor, *, max_length: int, batch_size: int, grad_accum: int,
    world_size: int, rank: int, warn: Callable[[str], None],
) -> TrainingData:
    """Encode the records files' examples, build the mixture and this process's step batches, and collect
    the held-out samples (an empty hold-out is an error when ``eval_steps`` asks for evaluations, else a
    warning given to ``warn``: never silent)."""
    data, evaluation, seed = config.data, config.evaluation, config.runtime.seed
    encode = dict(encode=processor.encode_example, max_length=max_length,
                  needs_image_sizes=processor.tokens.split_images)
    sources: list[Source] = [
        source if isinstance(source, RowSource)
        else RecordSource(text, encode_records(source, **encode), seed=seed, index=index)
        for index, (text, source) in enumerate(zip(data.sources, opened.sources))
    ]
    held: list[Iterator[Held]] = [
        iter(list(zip(origin, encode_records(origin, **encode)))) if isinstance(origin, list)
        else ((record, record) for record in origin)
        for origin in opened.held_out
    ]
    mixture = Mixture(sources, data.weights, seed=seed)
    batches = StepBatches(mixture, micro_batch=batch_size, world_size=world_size, rank=rank, accumulation=grad_accum)
    max_steps = config.optimization.max_steps
    if max_steps is None:
        if mixture.length is None:
            unknown = ", ".join(s.name for s in sources if s.length is None)
            raise ConfigError(f"the number of rows of {unknown} is not known before reading it: give --max-steps")
        max_steps = max(1, math.ceil(mixture.length / batches.global_batch))
    weights = mixture.weights if evaluation.data is None else [1.0]
    held_out = interleave(held, weights, seed=seed, limit=evaluation.rows)
    if not held_out and (evaluation.data is not None or evaluation.held_out_fraction > 0):
        problem = _empty_hold_out(config)
        if evaluation.steps:
            raise DataError(problem)
        warn(f"warning: {problem}")
    return TrainingData(mixture, batches, held_out, max_steps)


def _empty_hold_out(config: TrainConfig) -> str:
    evaluation = config.evaluation
    if evaluation.data is not None:
        origin = f"--val-data {evaluation.data} gave no samples"
    else:
        origin = (f"--val-fraction {evaluation.held_out_fraction} of the data held out no sample (a stream of "
                  "unknown length, or held-out rows emptied by the rating filters)")
    return (f"no held-out samples: {origin}, so the run cannot evaluate. Give held-out data with --val-data SOURCE, "
            "or hold out more with a larger --val-fraction" + ("" if evaluation.steps else " (or --val-fraction 0 "
            "to train without evaluating)"))


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
