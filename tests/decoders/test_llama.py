"""Llama family (SmolLM2 / Llama-3.2) against transformers' LlamaForCausalLM on tiny random twins."""

from __future__ import annotations

import pytest
import torch
from decoder_twins import hf_greedy, randomize_, rel_err, save_twin

transformers = pytest.importorskip("transformers")

VARIANTS = {
    # GQA 4:2, tied head, default RoPE (SmolLM2)
    "smollm2": dict(tie_word_embeddings=True, num_key_value_heads=2, rope_theta=100000.0),
    # untied head, llama3 frequency scaling (Llama-3.2), explicit head_dim != hidden / heads
    "llama32": dict(
        tie_word_embeddings=False,
        num_key_value_heads=1,
        head_dim=16,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
}


def make_twin(variant: str, tmp_path):
    options = dict(VARIANTS[variant])
    if "rope_theta" in options:
        options["rope_parameters"] = {"rope_type": "default", "rope_theta": options.pop("rope_theta")}
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
        **options,
    )
    torch.manual_seed(0)
    reference = randomize_(transformers.LlamaForCausalLM(config), seed=1, norm_offset=1.0).eval()
    ours = save_twin(reference, tmp_path / variant)
    return reference, ours


@pytest.fixture(scope="module", params=list(VARIANTS))
def twin(request, tmp_path_factory):
    return make_twin(request.param, tmp_path_factory.mktemp("llama"))


def test_config_and_keys(twin):
    reference, ours = twin
    assert ours.config.tie_word_embeddings == reference.config.tie_word_embeddings
    assert (ours.lm_head is None) == reference.config.tie_word_embeddings
    assert ours.vocab_size == 101 and ours.dim == 32
    expected_rope = reference.config.rope_parameters["rope_type"]
    assert ours.config.rope.type == expected_rope


def test_logits_match(twin):
    reference, ours = twin
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids).logits
    assert rel_err(actual, expected) <= 1e-5


def test_left_padded_logits_match(twin):
    """2-D padding mask; positions cumsum(mask) - 1, as transformers' generate gives them."""
    reference, ours = twin
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask).logits
    assert rel_err(actual[0, 5:], expected[0, 5:]) <= 1e-5
    assert rel_err(actual[1], expected[1]) <= 1e-5


def test_greedy_generation_matches_transformers(twin):
    reference, ours = twin
    ids = torch.randint(3, 101, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = hf_greedy(reference, ids, 20)
    actual = ours.generate(ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(actual, expected)
