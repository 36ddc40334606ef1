"""`tinyvlm eval` / `tinyvlm.evaluate` on a trained tiny VLM: the scores equal those computed from the model's
own `generate` answers, results are written atomically, and the command line reports them."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets
import pytest
import torch

import tinyvlm
from tinyvlm.cli import main
from tinyvlm.data import read_records
from tinyvlm.evaluation.metrics import extract_choice
from tinyvlm.data.answers import normalize_answer

POST = "\nAnswer with the option's letter from the given choices directly"
TOKENS = 8  # the model answers a letter or a word or two, then its end-of-turn token


@pytest.fixture(scope="module")
def vlm(shapes: dict[str, Path]):
    return tinyvlm.load_vlm(shapes["model"])


def test_mmstar_score_equals_the_score_of_generate_answers(shapes: dict[str, Path], vlm) -> None:
    """The same questions asked one at a time with `VLM.generate`, scored here: the letter as lmms-eval
    extracts it, then the mean over l2 categories of their accuracy."""
    rows = list(datasets.load_dataset("parquet", data_files=str(shapes["mmstar"]), split="train"))
    answers = [
        vlm.generate([{"role": "user", "content": row["question"].strip() + POST}], images=[row["image"].convert("RGB")],
                     max_new_tokens=TOKENS).split("\n\n")[0].strip()
        for row in rows
    ]  # fmt: skip
    by_l2 = defaultdict(list)
    for row, answer in zip(rows, answers):
        by_l2[row["l2_category"]].append(extract_choice(answer) == row["answer"])
    expected = sum(sum(hits) / len(hits) for hits in by_l2.values()) / len(by_l2)

    results = tinyvlm.evaluate(shapes["model"], "mmstar", data=str(shapes["mmstar"]), batch_size=5,
                               max_new_tokens=TOKENS, log_samples=True, progress=False)
    task = results["tasks"]["mmstar"]
    assert [entry["answer"] for entry in task["log"]] == answers  # batched, in the data's order
    assert task["score"] == pytest.approx(expected, abs=1e-12)
    assert task["samples"] == len(rows) == 24


def test_exact_match_equals_training_exact_match_of_generate_answers(shapes: dict[str, Path], vlm) -> None:
    records = read_records(shapes["records"])
    answers = [vlm.generate(r.prompt, images=list(r.images), max_new_tokens=32) for r in records]
    right = [normalize_answer(a) == normalize_answer(r.answer) for a, r in zip(answers, records)]
    assert 0 < sum(right) < len(right), "the fixture model should get some answers right and some wrong"

    task = tinyvlm.evaluate(vlm, "exact_match", data=str(shapes["records"]), batch_size=7, log_samples=True,
                            progress=False)["tasks"]["exact_match"]
    assert task["score"] == sum(right) / len(right)
    assert [entry["generated"] for entry in task["log"]] == answers
    assert [entry["reference"] for entry in task["log"]] == [r.answer for r in records]
    assert task["prompt"]["max_new_tokens"] == 32  # training's held-out default


def test_results_are_written_atomically(shapes: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out" / "results.json"
    results = tinyvlm.evaluate(shapes["model"], "mmstar", data=str(shapes["mmstar"]), limit=6, batch_size=3,
                               max_new_tokens=TOKENS, output=output, progress=False)
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert results["settings"]["limit"] == 6 and results["tasks"]["mmstar"]["samples"] == 6
    assert sorted(p.name for p in output.parent.iterdir()) == ["results.json"]  # no temporary file left
    before = output.read_text()
    with pytest.raises(tinyvlm.DataError):  # a failing run leaves the earlier results as they were
        tinyvlm.evaluate(shapes["model"], "mmstar", data=str(tmp_path / "missing.parquet"), output=output)
    assert output.read_text() == before


def test_eval_command(shapes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "results.json"
    args = ["eval", "--model", str(shapes["model"]), "--task", "mmstar", "--data", str(shapes["mmstar"]),
            "--batch-size", "4", "--max-new-tokens", str(TOKENS), "--limit", "8", "--output", str(output),
            "--log-samples", "--threads", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    results = json.loads(output.read_text())
    task = results["tasks"]["mmstar"]
    assert printed.out.startswith(f"mmstar: average {task['score']:.4f} on 8 samples")
    assert printed.err == ""  # --no-progress
    assert len(task["log"]) == 8 and set(task["log"][0]) >= {"prompt", "answer", "reference", "score", "l2_category"}
    assert results["settings"]["threads"] == 1
    assert main(args[:-2]) == 0  # without --threads
    assert "mmstar 8/8" in capsys.readouterr().err  # the progress line
    again = json.loads(output.read_text())["tasks"]["mmstar"]
    assert [e["answer"] for e in again["log"]] == [e["answer"] for e in task["log"]]  # deterministic


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "gqa"], "unknown task 'gqa'; choose from mmstar, vqav2_val, chartqa, exact_match"),
        (["--task", "mmstar,chartqa", "--data", "x.parquet"], "one task at a time"),
        (["--task", "mmstar", "--data", "missing.parquet"], "missing.parquet: no such file or folder"),
        (["--task", "exact_match"], "has no default data: give it with --data"),
        (["--task", "mmstar", "--threads", "0"], "--threads 0: must be >= 1"),
    ],
)
def test_eval_command_errors_are_one_line(shapes: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                          extra: list[str], message: str) -> None:
    assert main(["eval", "--model", str(shapes["model"]), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinyvlm eval: error: ") and message in err and err.count("\n") == 1
