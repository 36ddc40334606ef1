"""Task data: the rows of one split of a dataset source, in stored order, read through ``datasets``.

`read_rows` is the one place evaluation reads benchmark data from (the sources of `tinyvlm.data`'s reader,
issue 12, are meant to replace its body once they land):

* ``hf-dataset:ORG/NAME[/CONFIG][@REVISION]``: the Hub dataset, streamed;
* a parquet file (one split: the split asked for is not looked up);
* a folder: a ``datasets.save_to_disk`` folder, or any folder ``datasets.load_dataset`` reads (parquet
  files, a snapshot of a Hub dataset repo with its README's split configs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tinyvlm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from PIL import Image

HF_DATASET = "hf-dataset:"


@dataclass
class Rows:
    """The rows of a split (``length``: how many, when known without reading them)."""

    name: str
    rows: Iterator[dict[str, Any]]
    length: int | None


def read_rows(source: str, split: str | None, *, default_split: str) -> Rows:
    """The rows of ``split`` (None: ``default_split``) of ``source`` (see the module docstring), images
    decoded by ``datasets``. A parquet file is one split: naming one for it is a `ConfigError`."""
    datasets = require_datasets()
    chosen, split = split, split or default_split
    if source.startswith(HF_DATASET):
        repo, config, revision = _hub_dataset(source)
        try:
            dataset = datasets.load_dataset(repo, config, revision=revision, split=split, streaming=True)
        except Exception as error:  # not found, gated, offline, no such split: all end the run the same way
            raise DataError(f"{source}: cannot open split {split!r} ({type(error).__name__}: {error})") from None
        splits = getattr(dataset.info, "splits", None) or {}
        length = splits[split].num_examples if split in splits else None
        return Rows(f"{source} ({split})", iter(dataset), length or None)
    path = Path(source)
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if chosen is not None:
            raise ConfigError(f"--split {chosen}: {source} is one parquet file, one split; splits are chosen in "
                              "folders and hf-dataset: sources")
        try:
            length = pq.ParquetFile(path).metadata.num_rows
        except Exception as error:  # pyarrow's ArrowInvalid: not a parquet file
            raise DataError(f"{source}: cannot read it as parquet ({error})") from None
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        return Rows(source, iter(dataset), length)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise DataError(f"{source}: no split {split!r} (it has {', '.join(saved)}); choose one with --split")
                saved = saved[split]
            return Rows(f"{source} ({split})", iter(saved), len(saved))
        try:
            dataset = datasets.load_dataset(str(path), split=split, streaming=True)
        except ValueError as error:  # "Bad split: ... Available splits: [...]"
            raise DataError(f"{source}: {error}; choose the split with --split") from None
        return Rows(f"{source} ({split})", iter(dataset), None)
    raise DataError(
        f"{source}: expected a parquet file, a dataset folder or hf-dataset:ORG/NAME"
        + ("" if path.exists() else " (no such file or folder)")
    )


def _hub_dataset(source: str) -> tuple[str, str | None, str | None]:
    """``hf-dataset:ORG/NAME[/CONFIG][@REVISION]`` -> (repo, config, revision)."""
    body, _, revision = source[len(HF_DATASET):].partition("@")
    parts = body.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{source!r}: expected hf-dataset:ORG/NAME, hf-dataset:ORG/NAME/CONFIG, either with @REVISION")
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else None, revision or None


def require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError('reading benchmark data needs the datasets library: pip install "tinyvlm[eval]"') from None
    return datasets


def as_image(value: Any, where: str) -> "Image.Image":
    """A row's image as an RGB PIL image: a PIL image (``datasets``' decoded ``Image`` feature), or the
    stored ``{"bytes": ..., "path": ...}`` / bytes of one."""
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        try:
            value = Image.open(io.BytesIO(value))
        except OSError as error:
            raise DataError(f"{where}: the image cannot be decoded ({error})") from None
    if not isinstance(value, Image.Image):
        raise DataError(f"{where}: expected an image, got {type(value).__name__}")
    return value.convert("RGB")
