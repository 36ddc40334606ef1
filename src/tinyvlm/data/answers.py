"""How a generated answer is compared with a record's: exact match after normalisation. Torch-free; shared
by training's held-out accuracy, the demo and the evaluation tasks that score by exact match."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Exact match ignores case and surrounding / repeated whitespace."""
    return " ".join(text.split()).lower()
