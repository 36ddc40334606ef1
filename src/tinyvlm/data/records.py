"""Conversations and what training makes of them: records, encoded examples, padded or packed batches.

A `Record` is one conversation (chat messages) with its images, wherever it came from: a JSONL line, an
element of a JSON array (LLaVA's own files), or a row of a parquet / saved / Hub dataset
(`tinyvlm.data.schemas` turns rows into records). JSONL / JSON files are read whole by `read_records`; two
record styles are accepted (image paths are relative to the file)::

    {"image": "img/1.png", "conversations": [{"from": "human", "value": "<image>\\nColour?"}, {"from": "gpt", "value": "red"}]}
    {"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": "<image><image>Bigger?"}, {"role": "assistant", "content": "the first"}]}

`read_records` validates every record before training starts and raises one `DataError` that names the file,
the line and the problem of each bad record (bad JSON, unknown layout, missing or unreadable image, no
assistant turn, more ``<image>`` tags than images).

Batches come in two layouts. Padded: one sample per row, right-padded. Packed: the samples of a micro-batch
are placed into as few rows as fit ``max_length`` (first-fit decreasing), and each token may attend only to
earlier tokens *of its own sample* (a block-diagonal boolean mask, ANDed with the causal rule by the decoder)
while position ids restart at 0 for every sample, so a packed sample computes exactly what it would alone.
nanoVLM's packing lets samples attend across their boundaries and continues positions (its issue #201).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from tinyvlm.errors import DataError

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
MAX_REPORTED_PROBLEMS = 10


# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes (PNG, JPEG, ...), as parquet and Hugging Face datasets store images
    (``{"bytes": ..., "path": ...}``); decoded only when its pixels are needed."""

    data: bytes
    name: str = ""  # the original file name, if the dataset kept one

    def __repr__(self) -> str:
        return f"EncodedImage({self.name or 'unnamed'}, {len(self.data)} bytes)"


#: An image of a record: a file, encoded bytes, or an image already in memory.
ImageRef = Union[Path, EncodedImage, Image.Image]


def open_image(image: ImageRef) -> Image.Image:
    """The PIL image of ``image``, fully read (a `DataError` naming it if it cannot be decoded)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with _opened(image) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(_unreadable(image, error)) from None


def image_problem(image: ImageRef, *, decode: bool) -> str | None:
    """Why ``image`` cannot be used, or None. Reads its header (format and size), and its pixels with ``decode``
    (a truncated file has a good header)."""
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, Path) and not image.is_file():
        return f"{describe_image(image)} not found"
    try:
        with _opened(image) as opened:
            if opened.width < 1 or opened.height < 1:
                return f"{describe_image(image)} is empty"
            if decode:
                opened.load()
    except (UnidentifiedImageError, OSError) as error:
        return _unreadable(image, error)
    return None


def describe_image(image: ImageRef) -> str:
    """An image as messages name it: its path, or its file name and size (never an object's repr)."""
    if isinstance(image, Path):
        return f"image {str(image)!r}"
    if isinstance(image, EncodedImage):
        return f"image {image.name!r} ({len(image.data)} bytes)" if image.name else f"image of {len(image.data)} bytes"
    return "image"


def _opened(image: Path | EncodedImage) -> Image.Image:
    return Image.open(io.BytesIO(image.data) if isinstance(image, EncodedImage) else image)


def _unreadable(image: ImageRef, error: Exception) -> str:
    # PIL's message for data it does not recognise names the stream object (<_io.BytesIO object at 0x...>).
    why = "not an image file PIL recognises" if isinstance(error, UnidentifiedImageError) else str(error)
    return f"cannot read {describe_image(image)} ({why})"


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Record:
    """One conversation: chat messages (``role`` user / assistant / system) and its images, in order."""

    messages: tuple[dict[str, str], ...]
    images: tuple[ImageRef, ...]
    where: str  # "file.jsonl:LINE", "SOURCE row N": for error messages

    @property
    def answer(self) -> str:
        """The last assistant turn (the reference for exact-match accuracy)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to, not including, the last assistant turn."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return list(self.messages[:last])


def problems_error(what: str, problems: list[str], advice: str = "") -> DataError:
    """One `DataError` for many bad records: their count, the first `MAX_REPORTED_PROBLEMS`, what to do."""
    more = len(problems) - MAX_REPORTED_PROBLEMS
    shown = "; ".join(problems[:MAX_REPORTED_PROBLEMS]) + (f"; ... and {more} more" if more > 0 else "")
    return DataError(f"{len(problems)} {what}: {shown}{advice}")


def read_records(path: str | Path, *, check_images: bool = True) -> list[Record]:
    """Parse and validate every record of a JSONL file (one object per line) or of a JSON file holding an
    array of objects (LLaVA's ``llava_v1_5_mix665k.json``); raise one `DataError` listing the bad records."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: training data file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the training data file ({error})") from None
    records: list[Record] = []
    problems: list[str] = []
    checked: dict[Path, str | None] = {}
    for where, line in _entries(path, text):
        try:
            record = parse_record(line, base=path.parent, where=where)
            if check_images:
                for image in record.images:
                    if image not in checked:
                        checked[image] = image_problem(image, decode=False)
                    if checked[image]:
                        raise DataError(f"{where}: {checked[image]}")
            records.append(record)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise problems_error(f"bad record(s) in {path}", problems, ". Fix or remove these lines and run again.")
    if not records:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return records


def _entries(path: Path, text: str) -> list[tuple[str, str | Any]]:
    """``(where, JSON text or parsed object)`` per record: the lines of a JSONL file, or the elements of a
    JSON array (a file whose first character is ``[``)."""
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        return [(f"{path}[{i}]", obj) for i, obj in enumerate(array)]
    return [(f"{path}:{number}", line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_record(line: str | Any, *, base: Path, where: str) -> Record:
    """One JSONL line (or an already parsed JSON object) in either style -> `Record` (images not opened;
    see `read_records`)."""
    if isinstance(line, str):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    else:
        obj = line
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if ("conversations" in obj) == ("messages" in obj):
        raise DataError(
            f"{where}: expected exactly one of 'conversations' (LLaVA style) or 'messages' "
            f"(found keys: {', '.join(sorted(obj)) or 'none'})"
        )
    if "conversations" in obj:
        turns, role_key, content_key = obj["conversations"], "from", "value"
    else:
        turns, role_key, content_key = obj["messages"], "role", "content"
    images = tuple(base / image for image in _image_list(obj, where))
    return conversation_record(turns, role_key, content_key, images, where=where)


def conversation_record(
    turns: Any, role_key: str, content_key: str, images: tuple[ImageRef, ...], *, where: str
) -> Record:
    """Turns ``[{role_key: ..., content_key: ...}, ...]`` (LLaVA's ``from`` / ``value`` or the messages
    style's ``role`` / ``content``) and their images -> a checked `Record`."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: the conversation must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: turn {i} must be an object with {role_key!r} and {content_key!r}")
        role = ROLES.get(turn[role_key])
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown role {turn[role_key]!r} (expected one of {sorted(ROLES)})")
        messages.append({"role": role, "content": _text(turn[content_key], where, i)})
    return checked_record(messages, images, where=where)


def checked_record(messages: list[dict[str, str]], images: tuple[ImageRef, ...], *, where: str) -> Record:
    """A `Record` of normalised messages, refused (`DataError`) without an assistant turn or with ``<image>``
    tags that do not match the images."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to learn from this record")
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if tags > len(images):
        raise DataError(f"{where}: {tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)")
    if 0 < tags < len(images):
        raise DataError(
            f"{where}: {len(images)} images but only {tags} {IMAGE_TAG} tag(s): put one tag where each image "
            "goes, or none to place all images before the text"
        )
    return Record(messages=tuple(messages), images=images, where=where)


def _image_list(obj: dict[str, Any], where: str) -> list[str]:
    images = obj.get("images", [obj["image"]] if "image" in obj else [])
    if isinstance(images, str):  # LLaVA files sometimes hold one path under "images"
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise DataError(f"{where}: 'image' must be a path and 'images' a list of paths")
    return images


def _text(content: Any, where: str, turn: int) -> str:
    """A turn's text; the OpenAI-style list of parts becomes text with one ``<image>`` tag per image part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                parts.append(IMAGE_TAG)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: turn {turn} has a content part that is neither text nor image: {part!r}")
        return "".join(parts)
    raise DataError(f"{where}: turn {turn} content must be a string or a list of parts")


def split_records(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded held-out split: ``round(len * val_fraction)`` records (at least one when the fraction is
    positive), never all of them."""
    if val_fraction <= 0:
        return list(records), []
    count = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    if count <= 0:
        raise DataError(f"{len(records)} record(s) are too few to hold some out; set val_fraction to 0")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# ------------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    """One encoded record: token ids, labels (-100 outside assistant turns) and the images, in order."""

    input_ids: list[int]
    labels: list[int]
    images: tuple[ImageRef, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


#: ``encode(messages, images) -> (input_ids, labels)``: the processor's conversation encoder. An image is
#: None when the token layout does not depend on it, else a PIL image (at least its size is known).
Encode = Callable[[list[dict[str, str]], Sequence[Image.Image | None]], tuple[list[int], list[int]]]


class TooLong(DataError):
    """A record that encodes to more than ``max_length`` tokens (cutting it would cut an image or the answer)."""

    def __init__(self, where: str, tokens: int, max_length: int):
        super().__init__(f"{where}: {tokens} tokens, more than max_length={max_length} "
                         "(raise max_length or shorten the record)")


def encode_record(
    record: Record, encode: Encode, images: Sequence[Image.Image | None], *, max_length: int | None
) -> Example:
    """One record -> `Example`; ``images`` are what ``encode`` needs of the record's images (None, or opened
    images when the token layout depends on their sizes). `TooLong` past ``max_length``; a `DataError` naming
    the record for any other problem."""
    try:
        input_ids, labels = encode(list(record.messages), images)
    except DataError as error:
        raise DataError(f"{record.where}: {error}") from None
    if max_length is not None and len(input_ids) > max_length:
        raise TooLong(record.where, len(input_ids), max_length)
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{record.where}: encodes to no trainable tokens (empty assistant turns?)")
    return Example(list(input_ids), list(labels), record.images)


def encode_records(
    records: Sequence[Record], encode: Encode, *, max_length: int | None, needs_image_sizes: bool = False
) -> list[Example]:
    """Encode every record's text (image tokens are counted; pixels are read at batch time, and the image
    headers only when ``needs_image_sizes``, i.e. image splitting). A record longer than ``max_length`` is a
    `DataError`: cutting it would cut an image or the answer. All bad records are reported at once."""
    examples, problems = [], []
    for record in records:
        try:
            with contextlib.ExitStack() as stack:
                try:
                    images = [
                        stack.enter_context(_header(image)) if needs_image_sizes else None for image in record.images
                    ]
                except DataError as error:
                    raise DataError(f"{record.where}: {error}") from None
                examples.append(encode_record(record, encode, images, max_length=max_length))
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise problems_error("record(s) cannot be used", problems)
    return examples


@contextlib.contextmanager
def _header(image: ImageRef):
    """The image opened lazily (its size is read, not its pixels)."""
    if isinstance(image, Image.Image):
        yield image
        return
    try:
        opened = _opened(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(_unreadable(image, error)) from None
    with opened:
        yield opened


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """Model inputs for one micro-batch. ``segments[r, t]`` is the index (within the micro-batch) of the
    sample token ``t`` of row ``r`` belongs to, -1 for padding."""

    input_ids: Tensor  # [R, T]
    labels: Tensor  # [R, T]
    attention_mask: Tensor  # [R, T] (padded) or boolean [R, 1, T, T] (packed)
    position_ids: Tensor | None  # [R, T], restarting per sample when packed
    pixel_values: Tensor | None  # [images, 3, H, W] in the order their placeholders appear, row by row
    segments: Tensor  # [R, T]
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return int((self.segments >= 0).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
            move(self.pixel_values), move(self.segments), self.num_samples,
        )


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into bins whose sums are <= ``max_length``.
    Deterministic (ties keep input order); bins are returned in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > max_length:
            raise DataError(f"a sample of {lengths[i]} tokens cannot be packed into max_length={max_length}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


def collate(
    examples: Sequence[Example],
    pixel_values: Sequence[Tensor],
    *,
    pad_id: int,
    packed: bool,
    max_length: int | None,
) -> Batch:
    """Build a `Batch`. ``pixel_values[i]`` holds example ``i``'s images ``[n_i, 3, H, W]``."""
    if packed:
        if max_length is None:
            raise DataError("packing needs a max_length")
        rows = pack([len(e) for e in examples], max_length)
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    images: list[Tensor] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            example, n = examples[i], len(examples[i])
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous sample's last token
            segments[r, start : start + n] = i
            position_ids[r, start : start + n] = torch.arange(n)
            images.extend(pixel_values[i])
            start += n
    if packed:
        # Same-sample pairs may attend (the decoder adds the causal rule); padding forms its own block so
        # that no query row is fully masked (a fully masked softmax row gives NaN, also in the backward).
        attention_mask = (segments[:, :, None] == segments[:, None, :])[:, None]
        position_ids_out: Tensor | None = position_ids
    else:
        attention_mask = (segments >= 0).long()
        position_ids_out = None
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids_out,
        pixel_values=torch.stack(images) if images else None,
        segments=segments,
        num_samples=len(examples),
    )
