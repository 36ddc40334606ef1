"""Schemas recognised from the columns of real-layout parquet files, rows -> records, FineVision's rating
filters (nanoVLM's rule), bad rows named by their index, unknown layouts named by their columns."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tinyvlm.data.records import EncodedImage, open_image
from tinyvlm.data.schemas import RatingFilter, check_filters, detect_schema, image_ref
from tinyvlm.data.readers import open_rows, parse_source
from tinyvlm.errors import DataError

from writers import ROWS, cauldron_rows, finevision_rows, write_parquet

KEEP_ALL = RatingFilter()


def rows_of(tmp_path: Path, layout: str, count: int = 3):
    return open_rows(parse_source(str(write_parquet(tmp_path / f"{layout}.parquet", layout, ROWS[layout](count)))), "train")


def convert(rows, index: int = 0, ratings: RatingFilter = KEEP_ALL, row=None):
    schema = detect_schema(rows.columns, source=rows.name)
    row = row if row is not None else list(rows.read())[index]
    return schema.convert(row, where=f"{rows.name} row {index}", base=rows.base, ratings=ratings)


@pytest.mark.parametrize("layout", ["the_cauldron", "finevision", "llava", "messages"])
def test_each_layout_is_recognised_and_converted(tmp_path: Path, layout: str) -> None:
    rows = rows_of(tmp_path, layout)
    assert detect_schema(rows.columns, source=rows.name).name == layout
    record = convert(rows, 1).record
    assert record.where == f"{rows.name} row 1"
    assert record.messages[1] == {"role": "assistant", "content": "green"}
    (image,) = record.images
    assert isinstance(image, EncodedImage) and open_image(image).getpixel((0, 0)) == (0, 128, 0)
    text = " ".join(m["content"] for m in record.messages)
    # LLaVA and messages rows place their image with a tag; the_cauldron / FineVision texts have none (the
    # image then goes before the first user turn, as nanoVLM does)
    assert text.count("<image>") == (1 if layout in ("llava", "messages") else 0)


def test_cauldron_turns_become_a_multi_turn_conversation(tmp_path: Path) -> None:
    record = convert(rows_of(tmp_path, "the_cauldron"), 0).record  # row 0 has two turns
    assert record.messages == (
        {"role": "user", "content": "What colour is picture 0?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Is it dark?"}, {"role": "assistant", "content": "no"},
    )


def test_finevision_rating_filters_follow_nanovlm(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, "finevision")  # turn 0 rated 5/4/5/5, turn 1 rated 2/4/5/3
    assert len(convert(rows).record.messages) == 4 and convert(rows).dropped_turns == 0
    for ratings, kept in [(RatingFilter(relevance=3), 2), (RatingFilter(formatting=3), 4),
                          (RatingFilter(formatting=4), 2), (RatingFilter(relevance=2, visual_dependency=5), 4)]:
        converted = convert(rows, ratings=ratings)
        assert len(converted.record.messages) == kept and converted.dropped_turns == (4 - kept) // 2, ratings
    emptied = convert(rows, ratings=RatingFilter(image_correspondence=5))
    assert emptied.record is None and emptied.dropped_turns == 2
    # a missing rating list filters nothing (nanoVLM: `item.get(...) is not None`), a None rating neither
    row = {**finevision_rows(1)[0], "relevance_ratings": None, "formatting_ratings": [None, 2]}
    assert len(convert(rows, row=row, ratings=RatingFilter(relevance=5, formatting=2)).record.messages) == 4
    with pytest.raises(DataError, match=r"row 0: relevance_ratings has 1 entries for 2 turns"):
        convert(rows, row={**finevision_rows(1)[0], "relevance_ratings": [5]}, ratings=RatingFilter(relevance=3))


def test_a_filter_needs_some_source_with_its_ratings() -> None:
    check_filters({"fv": ["images", "texts", "relevance_ratings"], "cauldron": ["images", "texts"]},
                  RatingFilter(relevance=3))  # the_cauldron in the mix keeps its (unrated) turns
    with pytest.raises(DataError, match="--formatting-min-rating filters on FineVision's per-turn formatting_ratings"):
        check_filters({"cauldron": ["images", "texts"]}, RatingFilter(formatting=2))


def test_unknown_columns_name_what_was_found_and_expected() -> None:
    with pytest.raises(DataError) as caught:
        detect_schema(["question", "answer", "picture"], source="x.parquet")
    message = str(caught.value)
    assert "x.parquet: columns answer, picture, question match no known dataset layout" in message
    assert "the_cauldron (images, texts)" in message and "LLaVA (image or images, conversations)" in message


@pytest.mark.parametrize("row, problem", [
    ({"images": [], "texts": []}, "'texts' must be a non-empty list"),
    ({"images": [], "texts": [{"user": "q", "assistant": None, "source": "s"}]}, "texts[0] must have the strings"),
    ({"images": "a.png", "texts": [{"user": "q", "assistant": "a", "source": "s"}]}, "'images' must be a list"),
    ({"images": [{"bytes": None, "path": None}], "texts": [{"user": "q", "assistant": "a", "source": "s"}]},
     "an image must be"),
    ({"images": [], "texts": [{"user": "<image> q", "assistant": "a", "source": "s"}]}, "1 <image> tag(s) but 0 image(s)"),
])
def test_a_bad_row_is_named_by_its_index(tmp_path: Path, row: dict, problem: str) -> None:
    rows = rows_of(tmp_path, "the_cauldron")
    with pytest.raises(DataError, match=rf"{rows.name} row 7\b.*") as caught:
        schema = detect_schema(rows.columns, source=rows.name)
        schema.convert(row, where=f"{rows.name} row 7", base=rows.base, ratings=KEEP_ALL)
    assert problem in str(caught.value)


def test_llava_rows_without_an_image_are_text_only(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, "llava")
    row = {"id": "x", "image": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert convert(rows, row=row).record.images == ()


def test_image_forms(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), "blue").save(buffer, format="PNG")
    data = buffer.getvalue()
    Image.new("RGB", (3, 2), "blue").save(tmp_path / "b.png")
    pil = Image.new("RGB", (3, 2))
    assert image_ref(data, base=None, where="w") == EncodedImage(data)
    assert image_ref({"bytes": data, "path": "b.png"}, base=None, where="w") == EncodedImage(data, "b.png")
    assert image_ref({"bytes": None, "path": "b.png"}, base=tmp_path, where="w") == tmp_path / "b.png"
    assert image_ref("b.png", base=tmp_path, where="w") == tmp_path / "b.png"
    assert image_ref(pil, base=None, where="w") is pil
    with pytest.raises(DataError, match="w: the image is a remote file"):
        image_ref({"bytes": None, "path": "hf://datasets/x/y/a.png"}, base=None, where="w")
    with pytest.raises(DataError, match="relative path"):
        image_ref("b.png", base=None, where="w")
    for image, name in [(EncodedImage(b"not an image"), "image of 12 bytes"),
                        (EncodedImage(b"not an image", "x.png"), "image 'x.png' (12 bytes)")]:
        with pytest.raises(DataError) as error:
            open_image(image)
        # named by its name and size: PIL's own message would print the stream object, <_io.BytesIO object at 0x...>
        assert str(error.value) == f"cannot read {name} (not an image file PIL recognises)"


def test_cauldron_rows_from_pyarrow_are_read_alike(tmp_path: Path) -> None:
    from writers import write_raw_parquet

    raw = open_rows(parse_source(str(write_raw_parquet(tmp_path / "raw.parquet", cauldron_rows(2)))), "train")
    assert convert(raw, 0).record.messages == convert(rows_of(tmp_path, "the_cauldron", 2), 0).record.messages
