"""What a run reads, checked before its first step: held-out samples that never silently vanish (a small
parquet always holds one out; an empty hold-out is an error or a warning), and bad rows found up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinyvlm
from tinyvlm.errors import DataError
from tinyvlm.training.config import make_config
from tinyvlm.training.inputs import open_data

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from writers import cauldron_rows, finevision_rows, write_parquet  # noqa: E402

# at seed 0, 5 %: the hash rule holds out none of 32 rows of z.parquet (about one name in five), some of the others
NAMES = ["z.parquet", "a.parquet", "b.parquet", "shapes.parquet", "train.parquet"]
RUN = dict(model="test-vlm", batch_size=2, grad_accum=1, save_steps=0, eval_samples=1, logging_steps=1,
           progress=False, threads=1)


@pytest.mark.parametrize("name", NAMES)
def test_a_32_row_parquet_holds_out_a_sample_whatever_its_name(name: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / name, "the_cauldron", cauldron_rows(32, size=(40, 40)))
    opened = open_data(make_config(model="test-vlm", data=path, output_dir=tmp_path / "run", eval_steps=10))
    assert len(list(opened.held_out[0])) >= 1


def test_eval_steps_on_a_32_row_parquet_evaluates(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "z.parquet", "the_cauldron", cauldron_rows(32, size=(40, 40)))
    tinyvlm.train(**RUN, data=path, output_dir=tmp_path / "run", max_steps=3, eval_steps=2)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(entry["step"], entry["val_answered"]) for entry in log if "val_loss" in entry] == [(2, 1), (3, 1)]


def test_an_empty_hold_out_is_an_error_with_eval_steps_and_a_warning_without(tmp_path: Path, capsys) -> None:
    rows = finevision_rows(8)
    write_parquet(tmp_path / "good.parquet", "finevision", rows)
    for row in rows:  # every turn rated 1 for relevance: the filter below empties every held-out row
        row["relevance_ratings"] = [1, 1]
    write_parquet(tmp_path / "bad.parquet", "finevision", rows)
    options = dict(RUN, data=tmp_path / "good.parquet", val_data=tmp_path / "bad.parquet", relevance_min_rating=3,
                   max_steps=1)
    with pytest.raises(DataError, match=r"no held-out samples: --val-data .*bad.parquet gave no samples, so the run "
                       "cannot evaluate. Give held-out data with --val-data SOURCE, or hold out more with a larger "
                       "--val-fraction$"):
        tinyvlm.train(**options, output_dir=tmp_path / "a", eval_steps=1)
    assert not (tmp_path / "a").exists()  # before any step
    capsys.readouterr()
    tinyvlm.train(**options, output_dir=tmp_path / "b")
    assert "warning: no held-out samples: --val-data" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in entry for entry in log)


def test_a_broken_image_stops_the_run_before_any_step(tmp_path: Path) -> None:
    rows = cauldron_rows(100, size=(40, 40))
    rows[77]["images"][0]["bytes"] = b"\x89PNG not really"
    path = write_parquet(tmp_path / "broken.parquet", "the_cauldron", rows)
    result = subprocess.run(
        [sys.executable, "-m", "tinyvlm.cli", "train", "--model", "test-vlm", "--data", str(path), "--output-dir",
         str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--save-steps", "1"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"tinyvlm train: error: 1 bad row(s) in {path}: {path} row 77: cannot read image 'green.png' (15 bytes) (not "
        "an image file PIL recognises). Fix or remove these rows and run again."
    ]
    assert not (tmp_path / "run").exists()  # no step ran, no checkpoint was written
