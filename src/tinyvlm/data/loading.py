"""From stream items to model inputs, in DataLoader worker processes: images decoded and preprocessed, records
encoded, micro-batches collated, several micro-batches prepared ahead (``prefetch_factor`` per worker).

The DataLoader's batch sampler is the stream itself (`tinyvlm.data.stream.StepBatches`): it runs in the
main process and hands each worker the items of one micro-batch (examples, or records with their encoded
images); the worker returns a `MicroBatch`. A record longer than ``max_length`` is skipped and counted (a
JSONL / JSON file is checked whole before training instead); a bad image or record stops the run with a
`DataError` that names it, raised in the main process (not as a worker traceback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor

from tinyvlm.data.records import Batch, Example, Record, TooLong, collate, encode_record, open_image
from tinyvlm.data.stream import Item
from tinyvlm.errors import DataError

#: Skipped samples named in a message, at most.
NAMED_SKIPS = 3


@dataclass
class Prepared:
    """One item after the worker's work: its example and pixels, or why it was skipped, or the error."""

    example: Example | None = None
    pixels: Tensor | None = None
    skipped: str | None = None  # where the skipped record is from
    error: str | None = None


@dataclass
class MicroBatch:
    """A collated micro-batch (None when every sample was skipped) and the samples skipped from it."""

    batch: Batch | None
    skipped: list[str] = field(default_factory=list)
    error: str | None = None


class SampleMaker(torch.utils.data.Dataset):
    """``maker[item]``: the `Prepared` form of a stream item (a map-style dataset keyed by the items themselves,
    so that the DataLoader's workers do this work)."""

    def __init__(self, processor: Any, *, max_length: int | None):
        self.processor, self.max_length = processor, max_length

    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        if not images:
            return torch.empty(0, 3, 0, 0)
        return torch.cat([self.processor.views(image) for image in images])

    def __getitem__(self, item: Item) -> Prepared:  # type: ignore[override]
        try:
            if isinstance(item, Example):
                return Prepared(item, self.pixels([self._open(image, "") for image in item.images]))
            images = [self._open(image, item.where) for image in item.images]
            example = encode_record(item, self.processor.encode_example, images, max_length=self.max_length)
            return Prepared(example, self.pixels(images))
        except TooLong:
            return Prepared(skipped=item.where)
        except DataError as error:
            return Prepared(error=str(error))

    @staticmethod
    def _open(image: Any, where: str) -> Image.Image:
        try:
            return open_image(image)
        except DataError as error:
            raise DataError(f"{where}: {error}" if where else str(error)) from None


class Collator:
    """``collate_fn``: `Prepared` items -> a `MicroBatch` (a class, so worker processes can pickle it)."""

    def __init__(self, *, pad_id: int, packed: bool, max_length: int | None):
        self.pad_id, self.packed, self.max_length = pad_id, packed, max_length

    def __call__(self, items: Sequence[Prepared]) -> MicroBatch:
        errors = [item.error for item in items if item.error is not None]
        if errors:
            return MicroBatch(None, error=errors[0])
        kept = [item for item in items if item.example is not None]
        skipped = [item.skipped for item in items if item.skipped is not None]
        if not kept:
            return MicroBatch(None, skipped)
        try:
            batch = collate([item.example for item in kept], [item.pixels for item in kept],  # type: ignore[misc]
                            pad_id=self.pad_id, packed=self.packed, max_length=self.max_length)
        except DataError as error:
            return MicroBatch(None, error=str(error))
        return MicroBatch(batch, skipped)


def load(
    index_lists: Iterable[list[Item]], maker: SampleMaker, collator: Collator, *, workers: int,
    prefetch_factor: int, pin_memory: bool, seed: int = 0,
) -> Iterator[MicroBatch]:
    """`MicroBatch`es of ``index_lists`` in order, prepared by ``workers`` processes (0: in this one).

    The loader gets its own generator (seeded by ``seed``): one drawing from the global RNG when it starts
    would shift the random state training restores on resume (dropout masks would then differ)."""
    loader = torch.utils.data.DataLoader(
        maker, batch_sampler=index_lists, collate_fn=collator, num_workers=workers,  # type: ignore[arg-type]
        prefetch_factor=prefetch_factor if workers else None, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    for micro in loader:
        if micro.error is not None:
            raise DataError(micro.error)
        yield micro


def skipped_message(where: Sequence[str], total: int, max_length: int | None) -> str:
    """``N samples longer than max_length=L skipped (e.g. A, B, C)``."""
    named = ", ".join(where[:NAMED_SKIPS])
    return f"{total} sample(s) longer than max_length={max_length} skipped" + (f" (e.g. {named})" if named else "")


def filler_batch(processor: Any) -> Batch:
    """A one-sample batch (a blank image, a one-word answer) whose loss, multiplied by 0, lets a process whose
    micro-batch was entirely skipped still take part in DistributedDataParallel's gradient all-reduce."""
    size = processor.image_size
    blank = Image.new("RGB", (size, size))
    record = Record(({"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}), (blank,), "filler")
    example = encode_record(record, processor.encode_example, [blank], max_length=None)
    return collate([example], [torch.cat([processor.views(blank)])], pad_id=processor.pad_token_id, packed=False,
                   max_length=None)
