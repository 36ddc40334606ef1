"""Data checked before the first training step, so that a bad row stops a run before it builds a model,
not hours into it.

* A JSONL / JSON file: `tinyvlm.data.records.read_records` has checked every record and read every image's
  header; `check_records` decodes the images of the first `DECODED_ROWS` records.
* A local dataset (parquet, ``save_to_disk``): `check_rows` reads every row, converts it by its schema (the
  checks of `tinyvlm.data.schemas`) and reads every image's header; the images of the first `DECODED_ROWS`
  rows are decoded. Reading the rows costs about a pass over the files without decoding: seconds per
  hundred thousand rows.
* A streamed Hub dataset: the same for its first `HUB_HEAD_ROWS` rows only (reading every row would
  download it).

A truncated image has a good header, so one beyond the decoded rows is still found when its batch is built;
that error names the row too. Every problem found is reported in one `DataError` (file and row or line,
never an object's repr).
"""

from __future__ import annotations

from itertools import islice
from typing import Sequence

from tinyvlm.data.records import Record, image_problem, problems_error
from tinyvlm.data.schemas import RatingFilter, detect_schema
from tinyvlm.data.readers import Rows
from tinyvlm.errors import DataError

#: Rows (or records) whose images are decoded, not only their headers read.
DECODED_ROWS = 64
#: Rows of a streamed Hub dataset checked.
HUB_HEAD_ROWS = 64


def check_records(records: Sequence[Record]) -> None:
    """Decode the images of the first `DECODED_ROWS` records (every header was read with the file)."""
    problems = [f"{record.where}: {problem}" for record in records[:DECODED_ROWS] for image in record.images
                if (problem := image_problem(image, decode=True)) is not None]
    if problems:
        raise problems_error("record(s) with unreadable images", problems, ". Fix or remove them and run again.")


def check_rows(rows: Rows, *, ratings: RatingFilter, every_row: bool) -> None:
    """Convert every row of ``rows`` (``every_row``) or its first `HUB_HEAD_ROWS`, reading each image's header and
    decoding the images of the first `DECODED_ROWS` rows; one `DataError` names every bad row."""
    schema = detect_schema(rows.columns, source=rows.name)
    problems = []
    for index, row in enumerate(islice(rows.read(), None if every_row else HUB_HEAD_ROWS)):
        where = rows.where(index)
        try:
            record = schema.convert(row, where=where, base=rows.base, ratings=ratings).record
        except DataError as error:
            problems.append(str(error))
            continue
        for image in record.images if record is not None else ():
            problem = image_problem(image, decode=index < DECODED_ROWS)
            if problem is not None:
                problems.append(f"{where}: {problem}")
    if problems:
        raise problems_error(f"bad row(s) in {rows.name}", problems, ". Fix or remove these rows and run again.")
