"""Rows in the benchmarks' published schemas: ``datasets`` features of Lin-Chen/MMStar, lmms-lab/VQAv2 and
lmms-lab/ChartQA, and parquet files written with them (images as PNG bytes, as the Hub stores them)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
from PIL import Image


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
