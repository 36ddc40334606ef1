"""Training and evaluation data, in layers:

* `tinyvlm.data.readers`: source strings (files, folders, ``hf-dataset:ORG/NAME``) -> rows (torch-free;
  ``datasets`` imported only for dataset sources);
* `tinyvlm.data.schemas`: rows -> `Record`s, the layout recognised from the columns (the_cauldron,
  FineVision with its rating filters, LLaVA, messages);
* `tinyvlm.data.records`: records (JSONL / JSON files read whole), encoded `Example`s, padded or packed
  `Batch`es;
* `tinyvlm.data.stream`: the order of the samples (mixing, shuffling, held-out rows, the data position that
  checkpoints save);
* `tinyvlm.data.loading`: DataLoader workers that decode, encode and collate.

``from tinyvlm.data import X`` works for the names below without importing torch until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.lazy import lazy_attributes

_LAZY = {
    **{name: "tinyvlm.data.records" for name in (
        "IGNORE_INDEX", "IMAGE_TAG", "Batch", "EncodedImage", "Example", "ImageRef", "Record", "TooLong", "collate",
        "encode_record", "encode_records", "open_image", "pack", "parse_record", "read_records", "split_records",
    )},
    **{name: "tinyvlm.data.readers" for name in ("SourceSpec", "Rows", "open_rows", "parse_source")},
    **{name: "tinyvlm.data.schemas" for name in ("RatingFilter", "Schema", "detect_schema")},
    **{name: "tinyvlm.data.stream" for name in ("Mixture", "RecordSource", "RowSource", "StepBatches")},
    **{name: "tinyvlm.data.loading" for name in ("Collator", "MicroBatch", "SampleMaker")},
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.data.loading import Collator, MicroBatch, SampleMaker
    from tinyvlm.data.records import (
        IGNORE_INDEX, IMAGE_TAG, Batch, EncodedImage, Example, ImageRef, Record, TooLong, collate, encode_record,
        encode_records, open_image, pack, parse_record, read_records, split_records,
    )
    from tinyvlm.data.schemas import RatingFilter, Schema, detect_schema
    from tinyvlm.data.readers import Rows, SourceSpec, open_rows, parse_source
    from tinyvlm.data.stream import Mixture, RecordSource, RowSource, StepBatches
