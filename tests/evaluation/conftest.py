"""Evaluation fixtures: benchmark data in the published schemas (parquet with ``datasets`` features, images
as PNG bytes, as the Hub stores them) and a tiny VLM trained on the demo's shapes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from PIL import Image

import tinyvlm
from tinyvlm.data import read_records
from tinyvlm.demo import build_demo_vlm, demo_tokenizer
from tinyvlm.evaluation.shapes import choice_questions, write_mmstar_parquet, write_training_data

#: Short enough for CI (about 20 s on one thread), long enough to answer some questions right.
TRAIN_STEPS = 300


def png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> dict[str, Any]:
    """An image as ``datasets`` stores an ``Image`` feature."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_parquet(path: Path, rows: list[dict[str, Any]], features: dict[str, Any]) -> Path:
    columns = {name: [row[name] for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


def vqav2_features() -> dict[str, Any]:
    """lmms-lab/VQAv2's columns."""
    return {
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    }  # fmt: skip


def vqav2_row(question_id: int, question: str, answers: list[str], answer_type: str) -> dict[str, Any]:
    return {
        "question_type": "what color is the", "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        "image_id": question_id // 1000, "answer_type": answer_type, "question_id": question_id,
        "question": question, "image": png((question_id % 255, 10, 20)),
    }  # fmt: skip


def chartqa_features() -> dict[str, Any]:
    """lmms-lab/ChartQA's columns."""
    return {"type": datasets.Value("string"), "question": datasets.Value("string"),
            "answer": datasets.Value("string"), "image": datasets.Image()}  # fmt: skip


def mmstar_features() -> dict[str, Any]:
    """Lin-Chen/MMStar's columns."""
    return {
        "index": datasets.Value("int64"), "question": datasets.Value("string"), "image": datasets.Image(),
        "answer": datasets.Value("string"), "category": datasets.Value("string"),
        "l2_category": datasets.Value("string"),
        "meta_info": {"source": datasets.Value("string"), "split": datasets.Value("string"),
                      "image_path": datasets.Value("string")},
    }  # fmt: skip


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo-recipe VLM trained briefly on shapes questions, free-form and multiple choice (``model``), and
    held-out data it never saw: ``mmstar`` (a parquet in MMStar's schema) and ``records`` (free-form JSONL)."""
    from tinyvlm.demo import make_shapes_dataset

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
