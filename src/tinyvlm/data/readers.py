"""Data source strings -> rows. Torch-free; the `datasets` library is imported only when a source needs it.

A source string (``--data``, ``--val-data``, the evaluation commands) is one of:

* a JSONL file (one record per line) or a JSON file holding an array of records (LLaVA's own files):
  read whole and checked up front by `tinyvlm.data.records.read_records`;
* a parquet file, or a folder of parquet files (splits named as the Hub names them: ``train-*.parquet``,
  ``test/...``; everything is ``train`` otherwise);
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of splits);
* ``hf-dataset:ORG/NAME[/CONFIG][@REVISION]``: a dataset on the Hugging Face Hub, streamed (nothing is
  downloaded up front). ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) and
  ``HF_DATASETS_CACHE`` apply as in ``datasets`` itself. Without them, an endpoint that takes no TCP
  connection within 2 s (`tinyvlm.hub.hub_reachable`) stops the run at once, before ``datasets`` would retry.

Every form but the first is read through ``datasets`` (``pip install "tinyvlm[data]"``) as a stream of rows
(`Rows`) with images left encoded (``{"bytes": ..., "path": ...}``): pixels are decoded where the batch is
built. A `Rows` can save its position (``state``) and resume from it without reading what came before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tinyvlm.errors import DataError
from tinyvlm.hub import endpoint, hub_reachable, offline

HF_DATASET = "hf-dataset:"
#: Files read whole as records.
RECORD_SUFFIXES = (".jsonl", ".json")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string: a local ``path``, or a Hub dataset ``repo`` with its ``config`` and
    ``revision``."""

    text: str
    path: Path | None = None
    repo: str | None = None
    config: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def is_records_file(self) -> bool:
        """A JSONL / JSON file (read whole, map-style) rather than a stream of dataset rows."""
        return self.path is not None and self.path.suffix in RECORD_SUFFIXES


def parse_source(text: str | Path) -> SourceSpec:
    """Parse a source string (see the module docstring); a malformed ``hf-dataset:`` string is a `DataError`.
    Local paths are not checked here (`open_rows` and `read_records` do)."""
    text = str(text)
    if not text.startswith(HF_DATASET):
        if not text.strip():
            raise DataError("empty data source; give a JSONL / JSON / parquet file, a folder, or hf-dataset:ORG/NAME")
        return SourceSpec(text=text, path=Path(text))
    body = text[len(HF_DATASET):]
    body, at, revision = body.partition("@")
    parts = body.split("/")
    repo = "/".join(parts[:2])
    config = "/".join(parts[2:]) or None
    if not _REPO.match(repo) or (at and not revision) or (len(parts) > 2 and not config):
        raise DataError(
            f"{text!r}: expected hf-dataset:ORG/NAME, hf-dataset:ORG/NAME/CONFIG or either with @REVISION, "
            "e.g. hf-dataset:HuggingFaceM4/the_cauldron/ai2d"
        )
    return SourceSpec(text=text, repo=repo, config=config, revision=revision or None)


# ------------------------------------------------------------------------------------------------ rows


class Rows:
    """The rows of one split of a dataset, in its stored order, as plain dicts (images left encoded).

    ``read(state)`` starts a `RowReader` at the start, or at a position a reader's ``state()`` saved; only
    the file that position is in is re-read. ``make()`` builds a fresh ``datasets.IterableDataset`` of the
    split (its files were resolved once, when the source was opened).
    """

    def __init__(self, spec: SourceSpec, split: str, make: Callable[[], Any], *, length: int | None, base: Path | None,
                 files: Sequence[tuple[str, int]] = ()):
        self.spec, self.split, self._make = spec, split, make
        features = make().features
        self.columns: list[str] = list(features) if features is not None else []
        #: Rows in the split, when known without reading them (parquet metadata, a saved dataset, the card).
        self.length = length
        #: Folder that relative image paths in rows refer to (None for a Hub dataset).
        self.base = base
        #: The split's parquet files in reading order, with their row counts (to name a row's file).
        self.files = list(files)

    @property
    def name(self) -> str:
        return self.spec.text if self.split == "train" else f"{self.spec.text} (split {self.split})"

    @property
    def identity(self) -> str:
        """What names these rows wherever they are mounted: the file or folder name (not its whole path, which
        may differ between the nodes of one run), or the Hub dataset and config; and the split."""
        where = self.spec.path.name if self.spec.path is not None else f"{self.spec.repo}/{self.spec.config or ''}"
        return f"{where}:{self.split}"

    def where(self, index: int) -> str:
        """Row ``index`` (0-based, in the split's order) as messages name it: the source and the row, and the file
        and its own row when the split has several files."""
        if len(self.files) > 1:
            start = 0
            for file, rows in self.files:
                if index < start + rows:
                    return f"{self.name} row {index} ({Path(file).name} row {index - start})"
                start += rows
        return f"{self.name} row {index}"

    def read(self, state: dict[str, Any] | None = None) -> "RowReader":
        dataset = self._make().decode(False)  # images stay {"bytes", "path"}: decoded in the loader's workers
        if state is not None:
            dataset.load_state_dict(state)
        return RowReader(self.name, dataset)


class RowReader:
    """An iterator over rows whose ``state()`` is the position after the last row it yielded."""

    def __init__(self, name: str, dataset: Any):
        self.name, self._dataset = name, dataset
        self._rows = iter(dataset)

    def __iter__(self) -> "RowReader":
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._rows)
        except StopIteration:
            raise
        except Exception as error:  # datasets / pyarrow / fsspec errors while reading: a corrupt file, the network
            raise DataError(f"{self.name}: reading failed ({type(error).__name__}: {error})") from None

    def state(self) -> dict[str, Any]:
        return self._dataset.state_dict()


def open_rows(spec: SourceSpec, split: str) -> Rows:
    """Open split ``split`` of a dataset source (anything but a JSONL / JSON file) as `Rows`."""
    datasets = require_datasets()
    if spec.repo is not None:
        return _hub_rows(datasets, spec, split)
    path = spec.path
    assert path is not None
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(
                f"{path}: unknown kind of data file (expected .jsonl, .json or .parquet; a folder of parquet "
                "files; a save_to_disk folder; or hf-dataset:ORG/NAME)"
            )
        return _parquet_rows(datasets, spec, split, data_files=str(path), base=path.parent)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved_rows(datasets, spec, split)
    if next(path.rglob("*.parquet"), None) is not None:
        return _parquet_rows(datasets, spec, split, data_dir=str(path), base=path)
    raise DataError(
        f"{path}: a folder with neither parquet files nor a datasets save_to_disk layout "
        "(dataset_info.json + state.json, or dataset_dict.json)"
    )


def require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            'reading parquet, save_to_disk folders or hf-dataset: sources needs the datasets library: '
            'pip install "tinyvlm[data]"'
        ) from None
    return datasets


def _splits_error(spec: SourceSpec, split: str, available: Any) -> DataError:
    return DataError(
        f"{spec.text}: no split {split!r} (it has {', '.join(repr(s) for s in sorted(available))}); "
        "choose one with --data-split / --val-split (tinyvlm eval: --split)"
    )


def _parquet_rows(datasets: Any, spec: SourceSpec, split: str, *, base: Path, **where: str) -> Rows:
    import pyarrow.parquet as pq

    builder = datasets.load_dataset_builder("parquet", **where)
    files = builder.config.data_files or {}
    if split not in files:
        raise _splits_error(spec, split, files)
    try:
        counts = [(str(file), pq.ParquetFile(file).metadata.num_rows) for file in files[split]]
    except Exception as error:  # pyarrow's ArrowInvalid for a file that is not parquet
        raise DataError(f"{spec.text}: cannot read the parquet files ({error})") from None
    return Rows(spec, split, lambda: builder.as_streaming_dataset(split=split), length=sum(n for _, n in counts),
                base=base, files=counts)


def _saved_rows(datasets: Any, spec: SourceSpec, split: str) -> Rows:
    assert spec.path is not None
    try:
        saved = datasets.load_from_disk(str(spec.path))
    except Exception as error:  # datasets raises FileNotFoundError / ValueError for broken folders
        raise DataError(f"{spec.text}: cannot load the save_to_disk folder ({error})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise _splits_error(spec, split, saved)
        table = saved[split]
    else:
        own = str(saved.split) if saved.split is not None else "train"
        if split not in (own, "train"):
            raise _splits_error(spec, split, [own])
        table = saved
    return Rows(spec, split, table.to_iterable_dataset, length=len(table), base=spec.path)


def _hub_rows(datasets: Any, spec: SourceSpec, split: str) -> Rows:
    if not (offline() or datasets.config.HF_HUB_OFFLINE or hub_reachable()):
        # As for models (`tinyvlm.hub`): one TCP check of the endpoint, 2 s at most, instead of datasets' retries.
        raise DataError(
            f"{spec.text}: the Hub at {endpoint()} cannot be reached, and streaming a Hub dataset needs it. Check "
            "your connection; or train on a local copy (a parquet file or folder, a save_to_disk folder) downloaded "
            "while online; a dataset in the datasets cache loads with HF_HUB_OFFLINE=1"
        )
    try:
        builder = datasets.load_dataset_builder(spec.repo, spec.config, revision=spec.revision)
        builder.as_streaming_dataset(split=split)  # a bad split fails here, not at the first read
    except Exception as error:  # every failure of the Hub path: not found, gated, offline, bad config / split
        raise DataError(_hub_problem(spec, split, error)) from None
    splits = builder.info.splits or {}
    length = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return Rows(spec, split, lambda: builder.as_streaming_dataset(split=split), length=length, base=None)


def _hub_problem(spec: SourceSpec, split: str, error: Exception) -> str:
    kind = type(error).__name__
    text = str(error).splitlines()[0] if str(error) else kind
    if "offline" in text.lower() or kind in ("ConnectionError", "ConnectError", "OfflineModeIsEnabled"):
        return (f"{spec.text}: cannot reach the Hub ({text}). Streaming needs the network; with HF_HUB_OFFLINE=1 "
                "only datasets already in the cache load, so download it first or use a local copy")
    if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
        return (f"{spec.text}: not found on the Hub ({text}). Check the name; a private or gated dataset needs "
                "a token (HF_TOKEN or `hf auth login`)")
    if "split" in text.lower() and split in text:
        return f"{spec.text}: {text} (choose one with --data-split / --val-split; tinyvlm eval: --split)"
    return f"{spec.text}: cannot open the dataset ({kind}: {text})"
