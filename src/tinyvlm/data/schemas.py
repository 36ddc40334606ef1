"""Dataset rows -> `Record`s: the layouts VLM training data is published in, recognised from the columns.

=================  ==========================================================================================
schema             columns (others are ignored)
=================  ==========================================================================================
``finevision``     the_cauldron's, plus per-turn quality ratings (1-5): ``relevance_ratings``,
                   ``image_correspondence_ratings``, ``visual_dependency_ratings``, ``formatting_ratings``
                   (HuggingFaceM4/FineVision; it also has ``source`` and ``*_min`` columns)
``the_cauldron``   ``images`` (a list of images) and ``texts`` (a list of ``{user, assistant, source}`` turns)
                   (HuggingFaceM4/the_cauldron)
``llava``          ``conversations`` (``[{from: human | gpt | system, value}]``) and ``image`` (one image,
                   or none for a text-only row) or ``images`` (LLaVA-Instruct, LLaVA-OneVision)
``messages``       ``messages`` (``[{role, content}]``, content a string or a list of text / image parts) and
                   ``images`` (e.g. HuggingFaceH4/llava-instruct-mix-vsft)
=================  ==========================================================================================

An image in a row is what ``datasets`` stores for its ``Image`` feature, ``{"bytes": ..., "path": ...}``,
or plain bytes, a file path (relative to the dataset's folder), or a PIL image. the_cauldron and FineVision
texts carry no ``<image>`` tags: as nanoVLM does, the images go before the first user turn.

FineVision's rating filters are nanoVLM's (``data/datasets.py``): turn ``i`` is dropped when a rating list
is present and its ``i``-th rating is below that rating's minimum (1, the default, keeps everything); a row
whose every turn is dropped is skipped. Both are counted, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from tinyvlm.data.records import EncodedImage, ImageRef, Record, checked_record, conversation_record
from tinyvlm.errors import DataError

RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")


@dataclass(frozen=True)
class RatingFilter:
    """Minimum FineVision rating per kind (nanoVLM's ``*_min_rating``); 1 keeps every turn."""

    relevance: int = 1
    image_correspondence: int = 1
    visual_dependency: int = 1
    formatting: int = 1

    @property
    def active(self) -> dict[str, int]:
        """The kinds that filter (minimum above 1)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) > 1}


@dataclass(frozen=True)
class Converted:
    """A row as a record (None when the rating filters dropped every turn) and how many turns they dropped."""

    record: Record | None
    dropped_turns: int = 0


#: ``convert(row, where=..., base=..., ratings=...) -> Converted``
Convert = Callable[..., Converted]


@dataclass(frozen=True)
class Schema:
    name: str
    #: Columns that identify it (all present).
    columns: tuple[str, ...]
    #: Whether it carries FineVision's per-turn ratings (so the rating filters apply).
    rated: bool
    convert: Convert

    def matches(self, present: set[str]) -> bool:
        if not set(self.columns) <= present:
            return False
        return not self.rated or any(f"{kind}_ratings" in present for kind in RATINGS)


def image_ref(value: Any, *, base: Path | None, where: str) -> ImageRef:
    """One image of a row -> an `ImageRef`."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return EncodedImage(bytes(value))
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            return EncodedImage(bytes(value["bytes"]), name=value.get("path") or "")
        value = value.get("path")
    if isinstance(value, str) and value:
        if "://" in value:
            raise DataError(
                f"{where}: the image is a remote file ({value}) rather than bytes in the row; tinyvlm reads images "
                "stored in the rows (parquet, as the Hub's datasets keep them) or local files"
            )
        path = Path(value)
        if path.is_absolute():
            return path
        if base is None:
            raise DataError(f"{where}: the image is a relative path ({value}) and this source has no folder to resolve it in")
        return base / path
    raise DataError(
        f"{where}: an image must be {{'bytes': ..., 'path': ...}} (a datasets Image), bytes, a path or a PIL "
        f"image, got {type(value).__name__}"
    )


def _images(value: Any, *, base: Path | None, where: str, column: str) -> tuple[ImageRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {column!r} must be a list of images, got {type(value).__name__}")
    return tuple(image_ref(v, base=base, where=f"{where} image {i}") for i, v in enumerate(value))


def _kept_turns(row: dict[str, Any], turns: int, ratings: RatingFilter, where: str) -> list[bool]:
    """nanoVLM's rule: turn ``i`` goes when a rating list is present and its ``i``-th rating (if not None) is
    below the minimum of that rating."""
    kept = [True] * turns
    for kind, minimum in ratings.active.items():
        values = row.get(f"{kind}_ratings")
        if values is None:
            continue
        if len(values) != turns:
            raise DataError(f"{where}: {kind}_ratings has {len(values)} entries for {turns} turns")
        for i, value in enumerate(values):
            if value is not None and value < minimum:
                kept[i] = False
    return kept


def _cauldron(row: dict[str, Any], *, where: str, base: Path | None, ratings: RatingFilter) -> Converted:
    texts = row.get("texts")
    if not isinstance(texts, (list, tuple)) or not texts:
        raise DataError(f"{where}: 'texts' must be a non-empty list of {{user, assistant}} turns")
    images = _images(row.get("images"), base=base, where=where, column="images")
    kept = _kept_turns(row, len(texts), ratings, where)
    messages = []
    for i, (turn, keep) in enumerate(zip(texts, kept)):
        if not isinstance(turn, dict) or not isinstance(turn.get("user"), str) or not isinstance(turn.get("assistant"), str):
            raise DataError(f"{where}: texts[{i}] must have the strings 'user' and 'assistant'")
        if keep:
            messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
    dropped = kept.count(False)
    if not messages:
        return Converted(None, dropped)
    return Converted(checked_record(messages, images, where=where), dropped)


def _llava(row: dict[str, Any], *, where: str, base: Path | None, ratings: RatingFilter) -> Converted:
    if "images" in row and row["images"] is not None:
        images = _images(row["images"], base=base, where=where, column="images")
    elif row.get("image") is not None:  # a row without an image is a text-only conversation
        images = (image_ref(row["image"], base=base, where=where),)
    else:
        images = ()
    return Converted(conversation_record(row["conversations"], "from", "value", images, where=where))


def _messages(row: dict[str, Any], *, where: str, base: Path | None, ratings: RatingFilter) -> Converted:
    images = _images(row.get("images"), base=base, where=where, column="images")
    return Converted(conversation_record(row["messages"], "role", "content", images, where=where))


#: In the order they are tried (FineVision before the_cauldron, whose columns it extends).
SCHEMAS = (
    Schema("finevision", ("images", "texts"), rated=True, convert=_cauldron),
    Schema("the_cauldron", ("images", "texts"), rated=False, convert=_cauldron),
    Schema("llava", ("conversations",), rated=False, convert=_llava),
    Schema("messages", ("messages",), rated=False, convert=_messages),
)

_EXPECTED = (
    "the_cauldron (images, texts), FineVision (images, texts and relevance_ratings, image_correspondence_ratings, "
    "visual_dependency_ratings, formatting_ratings), LLaVA (image or images, conversations), "
    "messages (messages, images)"
)


def detect_schema(columns: Sequence[str], *, source: str) -> Schema:
    """The schema whose columns ``columns`` has; a `DataError` naming the columns found and those expected."""
    present = set(columns)
    for schema in SCHEMAS:
        if schema.matches(present):
            return schema
    found = ", ".join(sorted(present)) or "none"
    raise DataError(f"{source}: columns {found} match no known dataset layout; expected {_EXPECTED}")


def check_filters(columns_by_source: dict[str, Sequence[str]], ratings: RatingFilter) -> None:
    """A rating filter must have something to filter: refuse one that no source has the ratings for (a
    source without them, such as the_cauldron in a mix with FineVision, keeps all its turns)."""
    for kind in ratings.active:
        if not any(f"{kind}_ratings" in columns for columns in columns_by_source.values()):
            raise DataError(
                f"--{kind.replace('_', '-')}-min-rating filters on FineVision's per-turn {kind}_ratings, but no "
                f"data source has that column ({', '.join(columns_by_source)})"
            )
