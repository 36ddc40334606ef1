"""Source strings and opening every dataset form: parquet written by datasets and by pyarrow, parquet folders
with Hub-style split names, save_to_disk folders (Dataset and DatasetDict), splits, resumable reading."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyvlm.data.readers import SourceSpec, open_rows, parse_source
from tinyvlm.errors import DataError

from writers import cauldron_rows, dataset, write_parquet, write_raw_parquet


def test_parse_source_forms() -> None:
    assert parse_source("hf-dataset:HuggingFaceM4/the_cauldron") == SourceSpec(
        "hf-dataset:HuggingFaceM4/the_cauldron", repo="HuggingFaceM4/the_cauldron")
    spec = parse_source("hf-dataset:HuggingFaceM4/the_cauldron/ai2d@refs/convert/parquet")
    assert (spec.repo, spec.config, spec.revision) == ("HuggingFaceM4/the_cauldron", "ai2d", "refs/convert/parquet")
    spec = parse_source("hf-dataset:HuggingFaceM4/FineVision/sharegpt4v(coco)@dd30ac3")
    assert (spec.config, spec.revision) == ("sharegpt4v(coco)", "dd30ac3")
    local = parse_source(Path("data/train.jsonl"))
    assert local.path == Path("data/train.jsonl") and local.is_records_file
    assert parse_source("data.json").is_records_file and not parse_source("data.parquet").is_records_file
    for bad in ("hf-dataset:the_cauldron", "hf-dataset:a/b@", "hf-dataset:a/b/", "hf-dataset:/b", " "):
        with pytest.raises(DataError):
            parse_source(bad)


def first_users(rows) -> list[str]:
    return [row["texts"][0]["user"] for row in rows.read()]


def test_parquet_written_by_datasets_and_by_pyarrow(tmp_path: Path) -> None:
    by_datasets = open_rows(parse_source(str(write_parquet(tmp_path / "a.parquet", "the_cauldron", cauldron_rows(5)))), "train")
    by_pyarrow = open_rows(parse_source(str(write_raw_parquet(tmp_path / "b.parquet", cauldron_rows(5)))), "train")
    for rows in (by_datasets, by_pyarrow):
        assert rows.columns == ["images", "texts"] and rows.length == 5 and rows.base == tmp_path
        row = next(rows.read())
        image = row["images"][0]
        assert set(image) == {"bytes", "path"} and image["bytes"].startswith(b"\x89PNG")  # left encoded
    assert first_users(by_datasets) == first_users(by_pyarrow)
    with pytest.raises(DataError, match=r"no split 'test' \(it has 'train'\)"):
        open_rows(parse_source(str(tmp_path / "a.parquet")), "test")


def test_parquet_folder_splits_named_as_on_the_hub(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(4))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", "the_cauldron", cauldron_rows(3, start=4))
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", "the_cauldron", cauldron_rows(2, start=100))
    train = open_rows(parse_source(str(tmp_path)), "train")
    test = open_rows(parse_source(str(tmp_path)), "test")
    assert (train.length, test.length) == (7, 2)
    assert first_users(test) == ["What colour is picture 100?", "What colour is picture 101?"]
    assert sorted(first_users(train)) == sorted(f"What colour is picture {i}?" for i in range(7))
    assert test.name.endswith("(split test)")
    with pytest.raises(DataError, match=r"no split 'validation' \(it has 'test', 'train'\)"):
        open_rows(parse_source(str(tmp_path)), "validation")


def test_reading_resumes_from_a_saved_state_across_files(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(4))
    write_parquet(tmp_path / "train-00001-of-00002.parquet", "the_cauldron", cauldron_rows(4, start=4))
    rows = open_rows(parse_source(str(tmp_path)), "train")
    everything = first_users(rows)
    for cut in (1, 4, 6):
        reader = rows.read()
        for _ in range(cut):
            next(reader)
        assert [r["texts"][0]["user"] for r in rows.read(reader.state())] == everything[cut:]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    from datasets import DatasetDict

    dataset("the_cauldron", cauldron_rows(3)).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": dataset("the_cauldron", cauldron_rows(3)),
                 "validation": dataset("the_cauldron", cauldron_rows(2, start=50))}).save_to_disk(str(tmp_path / "dict"))
    one = open_rows(parse_source(str(tmp_path / "one")), "train")
    assert one.length == 3 and one.columns == ["images", "texts"]
    assert set(next(one.read())["images"][0]) == {"bytes", "path"}
    validation = open_rows(parse_source(str(tmp_path / "dict")), "validation")
    assert first_users(validation) == ["What colour is picture 50?", "What colour is picture 51?"]
    with pytest.raises(DataError, match="no split 'test'"):
        open_rows(parse_source(str(tmp_path / "dict")), "test")


def test_unusable_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.parquet").write_text("not parquet")
    for path, message in [(tmp_path / "absent.parquet", "no such file or folder"),
                          (tmp_path / "notes.txt", "unknown kind of data file"),
                          (tmp_path / "empty", "neither parquet files nor a datasets save_to_disk layout"),
                          (tmp_path / "fake.parquet", "cannot read the parquet files")]:
        with pytest.raises(DataError, match=message):
            open_rows(parse_source(str(path)), "train")


def test_without_datasets_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r'pip install "tinyvlm\[data\]"'):
        open_rows(parse_source(str(tmp_path / "x.parquet")), "train")


def test_hub_dataset_offline_is_a_data_error() -> None:
    with pytest.raises(DataError, match="hf-dataset:HuggingFaceM4/the_cauldron/ai2d: cannot reach the Hub.*HF_HUB_OFFLINE"):
        open_rows(parse_source("hf-dataset:HuggingFaceM4/the_cauldron/ai2d"), "train")


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "0"},  # online, but the endpoint takes no connection: one TCP check, no retries
    {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1"},
    {"HF_HUB_OFFLINE": "1"},
])
def test_hub_dataset_without_network_fails_in_seconds_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """As a model does (`tinyvlm.hub`): datasets alone retried 5 times, printing 11 lines over 31 s. The time is
    compared with the same command on a missing local file (the interpreter's and torch's start, which a busy
    machine stretches), so the bound holds under load: the retries added about 28 s to it."""

    def timed(data: str) -> tuple[subprocess.CompletedProcess, float]:
        command = [sys.executable, "-m", "tinyvlm.cli", "train", "--model", "test-vlm", "--data", data,
                   "--output-dir", str(tmp_path / "run")]
        began = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", **env})
        return result, time.monotonic() - began

    _, start_cost = timed(str(tmp_path / "missing.jsonl"))
    result, seconds = timed("hf-dataset:org/x")
    assert result.returncode == 1 and result.stderr.startswith("tinyvlm train: error: hf-dataset:org/x: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert seconds < start_cost + 8, (seconds, start_cost)  # one 2 s TCP check at most, no retries
    if env.get("HF_DATASETS_OFFLINE") != "1" and env["HF_HUB_OFFLINE"] == "0":
        assert "the Hub at http://127.0.0.1:9 cannot be reached" in result.stderr
    assert not (tmp_path / "run").exists()


def test_rows_of_a_folder_are_named_by_file_and_row(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(3))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", "the_cauldron", cauldron_rows(4, start=3))
    rows = open_rows(parse_source(str(tmp_path / "data")), "train")
    assert [row["texts"][0]["user"] for row in rows.read()][4] == "What colour is picture 4?"
    assert rows.where(4) == f"{tmp_path / 'data'} row 4 (train-00001-of-00002.parquet row 1)"
    assert rows.where(2) == f"{tmp_path / 'data'} row 2 (train-00000-of-00002.parquet row 2)"
    single = open_rows(parse_source(str(tmp_path / "data" / "train-00000-of-00002.parquet")), "train")
    assert single.where(2) == f"{tmp_path / 'data' / 'train-00000-of-00002.parquet'} row 2"
