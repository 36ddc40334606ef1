"""--report-to: TensorBoard event files, a wandb offline run and Trackio's local database hold the run's
metrics.jsonl values; metrics.png is a real picture of the curves; missing extras are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import tinyvlm
from tinyvlm.cli import main
from tinyvlm.evaluation.shapes import make_shapes_dataset
from tinyvlm.errors import ConfigError

RUN = dict(model="test-vlm", train="all", max_steps=3, batch_size=2, grad_accum=1, log_every=1, checkpoint_every=0,
           eval_samples=2, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=40, seed=1)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_every_tracker_gets_the_metrics(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    output = tmp_path / "my-run"
    tinyvlm.train(**RUN, data=data, output=output, report_to="tensorboard,wandb", project="tracked")
    log = metrics(output)
    train_losses = [e["loss"] for e in log if "loss" in e]
    final = log[-1]
    assert len(train_losses) == 3 and "val_accuracy" in final

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(train_losses, rel=1e-6)
    assert events.Scalars("val_loss")[-1].value == pytest.approx(final["val_loss"], rel=1e-6)
    assert {"lr/projector", "grad_norm", "tokens_per_s", "val_accuracy"} <= set(events.Tags()["scalars"])

    # the offline run's records (protobuf; history values are JSON text): every logged value is in them
    (records,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = records.read_bytes()
    assert recorded.startswith(b":W&B")
    for value in [*train_losses, final["val_loss"], *(e["grad_norm"] for e in log if "loss" in e)]:
        assert json.dumps(value).encode() in recorded, value
    assert b"val_accuracy" in recorded and b"tracked" in recorded  # the project
    assert "wrote the loss and accuracy curves to" in capsys.readouterr().err

    # trackio on its own (it and wandb both patch the process's logging, one tracker per test run is fairer)
    trackio_output = tmp_path / "trackio-run"
    tinyvlm.train(**RUN, data=data, output=trackio_output, report_to=["trackio"], project="tracked")
    from trackio.sqlite_storage import SQLiteStorage

    rows = SQLiteStorage.get_logs("tracked", "trackio-run")
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses == pytest.approx([e["loss"] for e in metrics(trackio_output) if "loss" in e], rel=1e-6)
    assert any(row.get("val_accuracy") == metrics(trackio_output)[-1]["val_accuracy"] for row in rows)


def test_curves_picture(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run"
    tinyvlm.train(**RUN, data=data, output=output)
    picture = output / "metrics.png"
    with Image.open(picture) as image:
        image.verify()
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # axes, text and curves, not a blank canvas
    drawn = picture.read_bytes()

    # tinyvlm plot redraws it; other values draw another picture
    lines = metrics(output)
    for entry in lines:
        if "loss" in entry:
            entry["loss"] *= 3
    (output / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert main(["plot", str(output)]) == 0
    assert f"wrote {picture}" in capsys.readouterr().out and picture.read_bytes() != drawn

    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_missing_extras_are_named(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown tracker"):
        tinyvlm.train(**RUN, data=data, output=tmp_path / "a", report_to="mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r'--report-to wandb needs wandb: pip install "tinyvlm\[wandb\]"'):
        tinyvlm.train(**RUN, data=data, output=tmp_path / "b", report_to="wandb")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # refused before training
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r'pip install "tinyvlm\[plot\]"'):
        from tinyvlm.training.plot import plot_run

        plot_run(tmp_path)
    from tinyvlm.training.plot import curves_after_run

    assert curves_after_run(tmp_path) == (f'curves not drawn (needs matplotlib): pip install "tinyvlm[plot]", then '
                                          f"tinyvlm plot {tmp_path}")
