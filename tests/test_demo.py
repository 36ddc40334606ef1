"""The demo: its synthetic data is deterministic and answerable, and a short run learns to see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyvlm.cli import main
from tinyvlm.data import read_records
from tinyvlm.demo import question_kind
from tinyvlm.evaluation.shapes import ANSWERS, CHANCE, COLOURS, POSITIONS, make_shapes_dataset


def test_dataset_is_deterministic_and_balanced(tmp_path: Path) -> None:
    first = make_shapes_dataset(tmp_path / "a", count=30, seed=5)
    again = make_shapes_dataset(tmp_path / "b", count=30, seed=5)
    other = make_shapes_dataset(tmp_path / "c", count=30, seed=6)
    assert first.read_text() == again.read_text() != other.read_text()
    for i in (0, 17):
        name = f"images/{i:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = read_records(first)
    kinds = [question_kind(r.prompt[-1]["content"]) for r in records]
    assert kinds.count("colour") == kinds.count("shape") == kinds.count("position") == 10
    for record, kind in zip(records, kinds):
        assert record.answer in ANSWERS[kind]
    assert CHANCE == pytest.approx((1 / 4 + 1 / 3 + 1 / 4) / 3)


def test_answers_are_in_the_pixels(tmp_path: Path) -> None:
    """Colour and position answers can be read back from the image (the task is not noise)."""
    records = read_records(make_shapes_dataset(tmp_path, count=60, seed=2))
    for record in records:
        kind = question_kind(record.prompt[-1]["content"])
        if kind == "shape":
            continue
        pixels = torch.frombuffer(bytearray(Image.open(record.images[0]).tobytes()), dtype=torch.uint8)
        pixels = pixels.view(64, 64, 3).float()
        background = pixels.view(-1, 3).median(0).values  # the shape covers under a fifth of the picture
        ink = (pixels - background).abs().sum(-1) > 90
        if kind == "colour":
            mean = pixels[ink].mean(0)
            nearest = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c], dtype=torch.float) - mean).norm()))
            assert nearest == record.answer, record.where
        else:
            rows, cols = ink.nonzero(as_tuple=True)
            where = ("top" if rows.float().mean() < 32 else "bottom") + (" left" if cols.float().mean() < 32 else " right")
            assert where == record.answer and where in POSITIONS


def training_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """The thread count, and whether it was fixed, while the demo trained."""
    import tinyvlm.demo
    from tinyvlm.inference import threads

    seen: list[tuple[int, bool]] = []
    train = tinyvlm.demo.train

    def recording(**options):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), threads.pinned()))
        return train(**options)

    monkeypatch.setattr(tinyvlm.demo, "train", recording)
    return seen


def test_short_demo_beats_chance(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    before, seen = torch.get_num_threads(), training_threads(monkeypatch)
    assert main(["demo", "--steps", "400", "--output", str(tmp_path)]) == 0
    assert seen == [(1, True)]  # the demo's fixed count while it worked
    assert torch.get_num_threads() == before  # and the process's own afterwards
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("held-out exact match"))
    accuracy = float(line.split(":")[1].split("%")[0]) / 100
    assert accuracy >= CHANCE + 0.15, line
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < 0.5 * log[0]["loss"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_demo_folder_is_kept_and_picked_up_where_it_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tinyvlm.demo import run_demo
    from tinyvlm.errors import ConfigError

    folder = tmp_path / "demo"
    small = dict(steps=4, images=60, output=folder, show=0, progress=False)
    first = run_demo(**small)
    out = capsys.readouterr().out
    assert "drew 60 images" in out and f"are in {folder}" in out
    data, weights = folder / "data" / "data.jsonl", first.model_dir / "model.safetensors"
    stamps = (data.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    again = run_demo(**small)  # finished: neither drawn nor trained again, only evaluated
    out = capsys.readouterr().out
    assert "using the 60 images" in out and "trained for 4 steps before" in out and "drew" not in out
    assert (data.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps and again.accuracy == first.accuracy

    shutil.rmtree(first.model_dir)  # killed after its last checkpoint: resumes from it
    resumed = run_demo(**small)
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert resumed.accuracy == first.accuracy and data.stat().st_mtime_ns == stamps[0]

    with pytest.raises(ConfigError, match=r"other settings \(steps 4 -> 5\): pass --overwrite"):
        run_demo(**{**small, "steps": 5})
    assert data.stat().st_mtime_ns == stamps[0]  # refused before drawing anything
    run_demo(**{**small, "steps": 5, "overwrite": True})
    assert "drew 60 images" in capsys.readouterr().out
    log = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(other), "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "is not empty and holds no demo run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_demo_thread_count_is_fixed_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from tinyvlm.inference import threads

    before, seen = torch.get_num_threads(), training_threads(monkeypatch)
    assert main(["demo", "--steps", "2", "--output", str(tmp_path / "a"), "--threads", "2"]) == 0
    assert seen == [(2, True)]  # fixed, not tuned per step
    assert torch.get_num_threads() == before and not threads.pinned()
    capsys.readouterr()
    assert main(["demo", "--steps", "2", "--output", str(tmp_path / "b"), "--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert "threads must be an integer >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before any work


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_bad_steps_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str) -> None:
    assert main(["demo", "--steps", steps, "--output", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert f"steps must be an integer >= 1 (the demo's default: leave it out); got {steps}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()  # nothing drawn
