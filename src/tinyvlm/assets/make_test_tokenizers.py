"""Regenerate the tokenizers shipped for the ``test-llama`` and ``test-gemma3`` zoo entries:
``python src/tinyvlm/assets/make_test_tokenizers.py``. 512-token byte-level BPEs trained on English text
from the Python standard library's docstrings plus short image-question sentences, one with SmolLM2's
ChatML specials and template, one with Gemma-3's."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

from tinyvlm.tokenizer import train_tokenizer

VOCAB_SIZE = 512
HERE = Path(__file__).parent
MODULES = ("argparse", "collections", "json", "pathlib", "random", "statistics", "string", "textwrap", "unittest",
           "logging", "functools", "itertools", "datetime", "calendar", "email", "http", "zipfile", "csv", "difflib")
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SHAPES = ("square", "circle", "triangle", "star", "rectangle")


def corpus() -> list[str]:
    texts = []
    for name in MODULES:
        module = importlib.import_module(name)
        texts += [getattr(module, attr).__doc__ or "" for attr in sorted(dir(module)) if not attr.startswith("_")]
        texts.append(module.__doc__ or "")
    for colour, shape in itertools.product(COLOURS, SHAPES):
        texts.append(f"What colour is the {shape}? The {shape} is {colour}. A {colour} {shape} on a white background.")
    return [t for t in texts if t]


def main() -> None:
    texts = corpus()
    for key, chat_format in (("test-llama", "chatml"), ("test-gemma3", "gemma")):
        tokenizer = train_tokenizer(texts, VOCAB_SIZE, chat_format=chat_format)
        assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
        tokenizer.save_pretrained(HERE / key)
        print(f"{key}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
