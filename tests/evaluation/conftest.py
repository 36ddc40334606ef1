"""Evaluation fixtures: a tiny VLM trained on the demo's shapes, and held-out data for it.

(tests/evaluation is a package so that this conftest is imported as ``evaluation.conftest``: a second
top-level ``conftest`` module would replace tests/conftest.py's in ``sys.modules``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tinyvlm
from tinyvlm.data import read_records
from tinyvlm.demo import build_demo_vlm, demo_tokenizer
from tinyvlm.evaluation.shapes import choice_questions, write_mmstar_parquet, write_training_data

#: Short enough for CI (about 20 s on one thread), long enough to answer some questions right.
TRAIN_STEPS = 300


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo-recipe VLM trained briefly on shapes questions, free-form and multiple choice (``model``), and
    held-out data it never saw: ``mmstar`` (a parquet in MMStar's schema) and ``records`` (free-form JSONL)."""
    from tinyvlm.evaluation.shapes import make_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes-model")
    data = write_training_data(folder / "train", count=300, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI runs two test processes on two cores
    try:
        vlm = build_demo_vlm(demo_tokenizer(read_records(data)), seed=0)
        vlm.save_pretrained(folder / "init")
        result = tinyvlm.train(
            model=f"local-dir:{folder / 'init'}", data=data, output=folder / "run", train="all", max_steps=TRAIN_STEPS,
            batch_size=16, grad_accum=1, lr=1e-3, warmup_steps=TRAIN_STEPS // 20, weight_decay=0.0, val_fraction=0,
            eval_samples=0, checkpoint_every=0, seed=0, device="cpu", progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "model": result.model_dir,
        "mmstar": write_mmstar_parquet(folder / "held-out" / "mmstar.parquet", choice_questions(24, seed=1000)),
        "records": make_shapes_dataset(folder / "held-out" / "free", count=24, seed=1001),
    }
