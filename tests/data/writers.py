"""Tiny datasets in the real published layouts, written with ``datasets`` itself (``Image()`` features, so the
parquet files carry image bytes in ``{"bytes", "path"}`` structs and datasets' schema metadata) or with plain
pyarrow structs (no metadata), for the tests of `tinyvlm.data` and training.

Layouts, as their dataset cards declare them (``dataset_info.features`` of the README):

* HuggingFaceM4/the_cauldron: ``images`` (sequence of image), ``texts`` (list of {user, assistant, source});
* HuggingFaceM4/FineVision (e.g. config ai2d @dd30ac3): ``images`` (list of image), ``texts`` (list of
  {user, assistant}), ``source``, and per-turn int64 lists ``relevance_ratings``,
  ``image_correspondence_ratings``, ``visual_dependency_ratings``, ``formatting_ratings``, each with a scalar
  ``*_min``;
* lmms-lab/LLaVA-OneVision-Data: ``id``, ``image`` (image), ``conversations`` (list of {from, value}),
  ``data_source``;
* HuggingFaceH4/llava-instruct-mix-vsft: ``messages`` (list of {content: list of {index, text, type}, role}),
  ``images`` (sequence of image).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

COLOURS = ("red", "green", "blue", "yellow")


def png(colour: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_struct(colour: str, size: tuple[int, int] = (16, 16)) -> dict[str, Any]:
    return {"bytes": png(colour, size), "path": f"{colour}.png"}


def cauldron_rows(count: int, *, start: int = 0, size: tuple[int, int] = (16, 16)) -> list[dict[str, Any]]:
    """the_cauldron rows: one image, one or two turns asking its colour (turn texts carry no <image> tag)."""
    rows = []
    for i in range(start, start + count):
        colour = COLOURS[i % len(COLOURS)]
        texts = [{"user": f"What colour is picture {i}?", "assistant": colour, "source": "synthetic"}]
        if i % 3 == 0:
            texts.append({"user": "Is it dark?", "assistant": "no", "source": "synthetic"})
        rows.append({"images": [image_struct(colour, size)], "texts": texts})
    return rows


def finevision_rows(count: int) -> list[dict[str, Any]]:
    """FineVision rows: two turns each, the second one rated low on relevance (2) and formatting (3)."""
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        texts = [{"user": f"Colour of {i}?", "assistant": colour}, {"user": "Shape?", "assistant": "square"}]
        ratings = {"relevance_ratings": [5, 2], "image_correspondence_ratings": [4, 4],
                   "visual_dependency_ratings": [5, 5], "formatting_ratings": [5, 3]}
        rows.append({"images": [image_struct(colour)], "texts": texts, "source": "synthetic", **ratings,
                     **{name.replace("_ratings", "_min"): min(values) for name, values in ratings.items()}})
    return rows


def llava_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        conversations = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": colour}]
        rows.append({"id": f"{i:06d}", "image": image_struct(colour), "conversations": conversations,
                     "data_source": "synthetic"})
    return rows


def messages_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        messages = [
            {"role": "user", "content": [{"index": None, "text": "What colour?", "type": "text"},
                                         {"index": 0, "text": None, "type": "image"}]},
            {"role": "assistant", "content": [{"index": None, "text": colour, "type": "text"}]},
        ]
        rows.append({"messages": messages, "images": [image_struct(colour)]})
    return rows


def features(layout: str):
    from datasets import Features, Image as ImageFeature, List, Value

    string, integer = Value("string"), Value("int64")
    if layout == "the_cauldron":
        return Features({"images": List(ImageFeature()),
                         "texts": List({"user": string, "assistant": string, "source": string})})
    if layout == "finevision":
        ratings = {}
        for kind in ("relevance", "image_correspondence", "visual_dependency", "formatting"):
            ratings[f"{kind}_ratings"] = List(integer)
            ratings[f"{kind}_min"] = integer
        return Features({"images": List(ImageFeature()), "texts": List({"user": string, "assistant": string}),
                         "source": string, **ratings})
    if layout == "llava":
        return Features({"id": string, "image": ImageFeature(),
                         "conversations": List({"from": string, "value": string}), "data_source": string})
    if layout == "messages":
        return Features({"messages": List({"content": List({"index": integer, "text": string, "type": string}),
                                           "role": string}),
                         "images": List(ImageFeature())})
    raise ValueError(layout)


ROWS = {"the_cauldron": cauldron_rows, "finevision": finevision_rows, "llava": llava_rows, "messages": messages_rows}


def dataset(layout: str, rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list(rows, features=features(layout))


def write_parquet(path: Path, layout: str, rows: list[dict[str, Any]]) -> Path:
    """Rows written by ``datasets`` (``Dataset.to_parquet``): Image features as {"bytes", "path"} structs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset(layout, rows).to_parquet(str(path))
    return path


def write_raw_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """the_cauldron rows written by pyarrow alone: the same structs, no datasets metadata in the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    schema = pa.schema([("images", pa.list_(image)), ("texts", pa.list_(turn))])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return path
