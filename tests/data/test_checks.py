"""Data checked before the first step: every row of a local dataset converted and its images' headers read,
the images of the first rows decoded, a Hub stream's head; bad rows named by file and row, never by an
object's repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyvlm.data.checks import DECODED_ROWS, HUB_HEAD_ROWS, check_records, check_rows
from tinyvlm.data.records import read_records
from tinyvlm.data.schemas import RatingFilter
from tinyvlm.data.readers import open_rows, parse_source
from tinyvlm.errors import DataError

from writers import cauldron_rows, png, write_parquet

NO_FILTER = RatingFilter()


def truncated_png() -> bytes:
    """A PNG whose header reads but whose pixels do not (a file cut short)."""
    return png("red", (64, 64))[:-40]


def rows_with(tmp_path: Path, bad: dict[int, bytes], count: int = 100, name: str = "d.parquet"):
    rows = cauldron_rows(count)
    for index, data in bad.items():
        rows[index]["images"][0]["bytes"] = data
    return open_rows(parse_source(str(write_parquet(tmp_path / name, "the_cauldron", rows))), "train")


def test_every_row_of_a_local_dataset_is_checked(tmp_path: Path) -> None:
    rows = rows_with(tmp_path, {90: b"not an image"})
    with pytest.raises(DataError) as error:
        check_rows(rows, ratings=NO_FILTER, every_row=True)
    message = str(error.value)
    assert message == (f"1 bad row(s) in {rows.name}: {rows.name} row 90: cannot read image 'blue.png' (12 bytes) "
                       "(not an image file PIL recognises). Fix or remove these rows and run again.")
    assert "0x" not in message and "\n" not in message
    check_rows(rows, ratings=NO_FILTER, every_row=False)  # a Hub stream's head: row 90 is not in it


def test_the_first_rows_are_decoded_later_ones_only_opened(tmp_path: Path) -> None:
    truncated = truncated_png()
    rows = rows_with(tmp_path, {3: truncated, DECODED_ROWS + 5: truncated})
    with pytest.raises(DataError, match=r"^1 bad row\(s\) in .*row 3: cannot read image 'yellow.png' \(\d+ bytes\) \(image "
                       r"file is truncated"):
        check_rows(rows, ratings=NO_FILTER, every_row=True)
    assert HUB_HEAD_ROWS <= DECODED_ROWS  # a Hub stream's checked rows are all decoded


def test_bad_rows_are_named_by_file_and_row(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(10))
    bad = cauldron_rows(10, start=10)
    bad[4]["texts"] = [{"user": "?", "assistant": None, "source": "x"}]
    bad[6]["images"][0]["bytes"] = b"GIF89a broken"
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", "the_cauldron", bad)
    rows = open_rows(parse_source(str(tmp_path / "data")), "train")
    with pytest.raises(DataError, match=r"^2 bad row\(s\) in .*data row 14 \(train-00001-of-00002.parquet row 4\): "
                       r"texts\[0\] must have .*; .*data row 16 \(train-00001-of-00002.parquet row 6\): cannot read"):
        check_rows(rows, ratings=NO_FILTER, every_row=True)


def test_the_first_records_of_a_file_are_decoded(tmp_path: Path) -> None:
    (tmp_path / "cut.png").write_bytes(truncated_png())
    line = '{"image": "cut.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "red"}]}'
    (tmp_path / "data.jsonl").write_text(line + "\n")
    records = read_records(tmp_path / "data.jsonl")  # its header reads
    with pytest.raises(DataError, match=r"data.jsonl:1: cannot read image '.*cut.png' \(image file is truncated"):
        check_records(records)
