"""Every decoder zoo entry: builds on the meta device with the published parameter count (where the
checkpoint's size is known), has its Hub repo and gating; the random-init ``test-*`` entries run end to end
with their shipped tokenizers."""

from __future__ import annotations

import pytest
import torch

import tinyvlm
from tinyvlm.registry import get_family

# Stored parameters (tied heads not stored), from the published safetensors sizes (backbones.md §0.1).
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "smollm2-135m-instruct": 134_515_008,
    "smollm2-360m-instruct": 361_821_120,
    "llama-3.2-1b": 1_235_814_400,
    "gemma-3-270m": 268_098_176,
    "gemma-3-270m-it": 268_098_176,
    "gemma-3-1b-it": 999_885_952,
}
GATED = ("llama-3.2-", "gemma-3-")
DECODERS = [spec.key for spec in tinyvlm.list_models(kind="decoder")]


def test_expected_entries_exist():
    expected = {
        "smollm2-135m", "smollm2-135m-instruct", "smollm2-360m", "smollm2-360m-instruct", "smollm2-1.7b",
        "smollm2-1.7b-instruct", "llama-3.2-1b", "llama-3.2-1b-instruct", "llama-3.2-3b", "llama-3.2-3b-instruct",
        "gemma-3-270m", "gemma-3-270m-it", "gemma-3-1b-it", "test-llama", "test-gemma3",
    }
    assert expected <= set(DECODERS)


@pytest.mark.parametrize("key", DECODERS)
def test_entry_builds_on_meta(key):
    spec = tinyvlm.get_spec(key)
    with torch.device("meta"):
        module = get_family(spec.family).build(spec.config)
    assert module.dim == spec.dim == spec.config.hidden_size
    assert sum(p.numel() for p in module.parameters()) == spec.params
    if key in PUBLISHED_PARAMS:
        assert spec.params == PUBLISHED_PARAMS[key]
    assert spec.gated == key.startswith(GATED)
    assert (spec.hub_repo is None) == key.startswith("test-")
    assert spec.config.eos_token_ids, "generation needs the checkpoint's stop ids"
    if key.startswith("gemma-3-") and key.endswith("-it"):
        assert spec.config.eos_token_ids == [1, 106]


@pytest.mark.parametrize("key", [k for k in DECODERS if k.startswith("test-")])
def test_random_entries_run_with_their_tokenizer(key):
    torch.manual_seed(0)
    decoder = tinyvlm.build_decoder(key)
    tokenizer = tinyvlm.load_tokenizer(key)
    assert len(tokenizer) == decoder.vocab_size
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))])
    out = decoder.generate(ids, max_new_tokens=5)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 5
    assert isinstance(tokenizer.decode(out[0, ids.shape[1]:].tolist()), str)
    bf16 = tinyvlm.build_decoder(key, dtype=torch.bfloat16)
    assert bf16(ids).logits.dtype == torch.bfloat16
