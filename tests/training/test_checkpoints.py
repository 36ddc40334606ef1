"""Resuming: a finished run extended by a larger max_steps (the schedule recomputed for the new total), a
max_steps below the checkpoint refused, and a checkpoint written before the options had sections resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tinyvlm.cli import main
from tinyvlm.demo import make_shapes_dataset
from tinyvlm.training.loop import lr_factor

from .test_config import FLAT_CONFIG


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=40, seed=1)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def command(data: Path, run: Path, *flags: str) -> list[str]:
    return ["train", "--model", "test-vlm", "--data", str(data), "--output-dir", str(run), "--batch-size", "2",
            "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2", "--warmup-steps", "1", "--save-steps", "2",
            "--logging-steps", "1", "--eval-samples", "1", "--no-progress", "--threads", "1", *flags]


def test_a_finished_run_is_extended_by_a_larger_max_steps(data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(command(data, run, "--max-steps", "4")) == 0
    before, four_steps = log(run), load_file(str(run / "model" / "model.safetensors"))
    assert main(command(data, run, "--max-steps", "6", "--resume")) == 0  # was: "options changed (max_steps: 4 -> 6)"
    after = log(run)
    steps = [entry for entry in after if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[:4] == [entry for entry in before if "loss" in entry]  # the first 4 steps as they were
    # steps 1-4 followed the cosine to step 4, steps 5-6 the one recomputed for the new total of 6 (warm-up 1)
    for entry in steps:
        total = 4 if entry["step"] <= 4 else 6
        expected = 1e-2 * lr_factor(entry["step"] - 1, max_steps=total, warmup_steps=1, min_lr_ratio=0.1)
        assert entry["lr"]["projector"] == pytest.approx(expected, rel=1e-12), entry
    assert steps[3]["lr"]["projector"] == pytest.approx(1e-3) and steps[4]["lr"]["projector"] > 2e-3
    assert [entry["step"] for entry in after if "val_loss" in entry] == [4, 6]  # the 4-step run's, and the new end
    six_steps = load_file(str(run / "model" / "model.safetensors"))
    assert any(not six_steps[name].equal(four_steps[name]) for name in six_steps if name.startswith("projector."))
    capsys.readouterr()
    assert main(command(data, run, "--max-steps", "5", "--resume")) == 1
    assert "it is at step 6, past max_steps 5. Give max_steps 6 or more" in capsys.readouterr().err


def test_a_checkpoint_with_the_flat_options_of_earlier_versions_resumes(data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "old"
    flags = ["--save-steps", "1", "--eval-samples", "0"]
    assert main(command(data, run, *flags, "--max-steps", "2")) == 0
    state_file = run / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"] = {**FLAT_CONFIG, "data": [str(data)], "output": str(run), "lr": 1e-2, "warmup_steps": 1,
                       "log_every": 1}
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(command(data, run, *flags, "--max-steps", "2", "--resume", "--learning-rate", "0.1")) == 1
    assert "options changed since it was written (learning_rate: 0.01 -> 0.1)" in capsys.readouterr().err
    assert main(command(data, run, *flags, "--max-steps", "3", "--resume")) == 0
    assert [entry["step"] for entry in log(run) if "loss" in entry] == [1, 2, 3]
