"""Gemma-3 text decoder against transformers' Gemma3ForCausalLM on tiny random twins: 6 layers (5 sliding,
1 global), window 8, prompts longer than the window, head_dim != hidden / heads, query_pre_attn_scalar != head_dim."""

from __future__ import annotations

import json

import pytest
import torch
from decoder_twins import hf_greedy, randomize_, rel_err, save_twin

import tinyvlm

transformers = pytest.importorskip("transformers")

WINDOW = 8


@pytest.fixture(scope="module", params=[1, 2], ids=["mqa", "gqa"])
def twin(request, tmp_path_factory):
    config = transformers.Gemma3TextConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=request.param,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        max_position_embeddings=256,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    reference = randomize_(transformers.Gemma3ForCausalLM(config), seed=3, norm_offset=0.0).eval()
    ours = save_twin(reference, tmp_path_factory.mktemp("gemma3"))
    return reference, ours


def test_config(twin):
    reference, ours = twin
    assert ours.config.layer_types == list(reference.config.layer_types)
    assert ours.config.layer_types.count("full_attention") == 1
    assert ours.config.sliding_window == WINDOW
    assert ours.lm_head is None


def test_logits_match_beyond_window(twin):
    reference, ours = twin
    ids = torch.randint(0, 101, (2, 3 * WINDOW + 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids).logits
    assert rel_err(actual, expected) <= 1e-5


def test_embed_scale_matches(twin):
    reference, ours = twin
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(ours.embed(ids), reference.model.embed_tokens(ids))


def test_greedy_generation_matches_transformers(twin):
    reference, ours = twin
    ids = torch.randint(3, 101, (1, WINDOW + 3), generator=torch.Generator().manual_seed(2))
    expected = hf_greedy(reference, ids, 3 * WINDOW)
    actual = ours.generate(ids, max_new_tokens=3 * WINDOW, eos_token_id=[])
    assert torch.equal(actual, expected)


def test_generation_config_stop_ids_are_read(twin, tmp_path):
    """A Gemma-3-it folder stops on the ids of its generation_config.json ([1, 106]), not config.json's 1."""
    reference, ours = twin
    ids = torch.randint(3, 101, (1, 5), generator=torch.Generator().manual_seed(2))
    stop = ours.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1].item()
    assert stop != 1 and ours.generate(ids, max_new_tokens=12).shape[1] == 5 + 12  # eos 1 alone never stops it
    reference.save_pretrained(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, stop]}))

    loaded = tinyvlm.build_decoder(f"local-dir:{tmp_path}", dtype=torch.float32)
    assert loaded.config.eos_token_ids == [1, stop]
    actual = loaded.generate(ids, max_new_tokens=12)
    assert actual[0, 5:].tolist() == [stop]
    expected = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
    )
    assert torch.equal(actual, expected)
