"""Generation and the KV cache, on both families: incremental = full forward (across sliding-window ring
wrap-around), left-padded batches = one by one, packed 4-D masks = separate sequences, sampling options,
stop ids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "decoders"))

from decoder_twins import randomize_, rel_err, save_twin  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.errors import ConfigError  # noqa: E402
from tinyvlm.generation import filter_logits  # noqa: E402


@pytest.fixture(scope="module", params=["test-llama", "test-gemma3"])
def decoder(request):
    torch.manual_seed(0)
    model = tinyvlm.build_decoder(request.param)
    return randomize_(model, seed=5, norm_offset=1.0 if request.param == "test-llama" else 0.0)


def ids_of(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunks", [(40,), (5, *[1] * 35), (20, 1, 1, 7, *[1] * 11), (3, 30, 7)])
def test_incremental_equals_full_forward(decoder, chunks):
    """Prompts shorter and longer than the window (16 in test-gemma3), single steps across wrap-around,
    multi-token chunks on a wrapped ring."""
    ids = ids_of(2, sum(chunks))
    with torch.no_grad():
        full = decoder(ids).logits
        cache = decoder.new_cache(2, ids.shape[1])
        start, pieces = 0, []
        for size in chunks:
            pieces.append(decoder(ids[:, start : start + size], cache=cache).logits)
            start += size
    assert rel_err(torch.cat(pieces, 1), full) <= 1e-5


def test_cache_overflow_is_a_clear_error(decoder):
    cache = decoder.new_cache(1, 4)
    with pytest.raises(ConfigError, match="max_len"):
        decoder(ids_of(1, 5), cache=cache)


def test_left_padded_batch_equals_one_by_one(decoder):
    prompts = [ids_of(1, n, seed=n)[0] for n in (6, 20, 11)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    together = decoder.generate(batch, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = decoder.generate(prompt[None], max_new_tokens=24, eos_token_id=[])
        assert torch.equal(together[row, width:], alone[0, len(prompt) :])


def test_packed_4d_mask_equals_separate_sequences(decoder):
    """Two samples packed in one row, attention kept inside each, positions restarting per sample."""
    a, b = ids_of(1, 13, seed=1), ids_of(1, 22, seed=2)
    packed = torch.cat((a, b), 1)
    sample = torch.tensor([0] * 13 + [1] * 22)
    allowed = (sample[:, None] == sample[None, :])[None, None]
    positions = torch.cat((torch.arange(13), torch.arange(22)))[None]
    with torch.no_grad():
        out = decoder(packed, attention_mask=allowed, position_ids=positions).logits
        assert rel_err(out[:, :13], decoder(a).logits) <= 1e-5
        assert rel_err(out[:, 13:], decoder(b).logits) <= 1e-5


def test_inputs_embeds_path_equals_ids(decoder):
    ids = ids_of(1, 9)
    with torch.no_grad():
        embeds = decoder.embed(ids)
        assert torch.equal(decoder(inputs_embeds=embeds).logits, decoder(ids).logits)
    assert torch.equal(
        decoder.generate(ids, inputs_embeds=embeds, max_new_tokens=6, eos_token_id=[]),
        decoder.generate(ids, max_new_tokens=6, eos_token_id=[]),
    )


def test_stream_yields_the_generated_tokens(decoder):
    ids = ids_of(2, 5)
    steps = list(decoder.generate_stream(ids, max_new_tokens=7, eos_token_id=[]))
    assert len(steps) == 7 and all(step.shape == (2,) for step in steps)
    assert torch.equal(torch.stack(steps, 1), decoder.generate(ids, max_new_tokens=7, eos_token_id=[])[:, 5:])
    assert not torch.is_inference_mode_enabled()


def test_stop_ids_end_rows_and_pad_the_rest(decoder):
    ids = ids_of(2, 5, seed=3)
    free = decoder.generate(ids, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, 5 + 2])  # the third token of row 0 becomes a stop id
    out = decoder.generate(ids, max_new_tokens=12, eos_token_id=[stop, 10**6])
    first_stop = [int((row[5:] == stop).nonzero()[0]) if (row[5:] == stop).any() else None for row in free]
    pad = decoder.config.pad_token_id
    for row, end in enumerate(first_stop):
        if end is None:
            assert torch.equal(out[row, : free.shape[1]], free[row]) or out.shape[1] < free.shape[1]
        else:
            assert torch.equal(out[row, : 5 + end + 1], free[row, : 5 + end + 1])
            assert (out[row, 5 + end + 1 :] == pad).all()
    if all(end is not None for end in first_stop):  # every row ended: stopped early
        assert out.shape[1] == 5 + max(first_stop) + 1


def test_default_stop_ids_are_the_checkpoints(decoder):
    ids = ids_of(1, 4, seed=4)
    free = decoder.generate(ids, max_new_tokens=6, eos_token_id=[])
    config_stop = decoder.config.eos_token_ids[0]
    patched = decoder.config.replace(eos_token_ids=[int(free[0, 4])])  # the first new token
    original, decoder.config = decoder.config, patched
    try:
        out = decoder.generate(ids)
    finally:
        decoder.config = original
    assert out.shape[1] == 5 and config_stop in original.eos_token_ids


def test_sampling_is_seeded_and_respects_top_k(decoder):
    ids = ids_of(3, 6)
    torch.manual_seed(123)
    first = decoder.generate(ids, max_new_tokens=10, temperature=1.0, top_k=5, eos_token_id=[])
    torch.manual_seed(123)
    second = decoder.generate(ids, max_new_tokens=10, temperature=1.0, top_k=5, eos_token_id=[])
    assert torch.equal(first, second)
    torch.manual_seed(7)
    greedy_like = decoder.generate(ids, max_new_tokens=10, temperature=1.0, top_k=1, eos_token_id=[])
    assert torch.equal(greedy_like, decoder.generate(ids, max_new_tokens=10, eos_token_id=[]))


def test_filter_logits_masks():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    # nucleus 0.75: 0.5 + 0.3 reaches it; 0.15 and 0.05 are dropped
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, True, False, False]]
    assert not torch.isinf(filter_logits(logits, top_p=0.01)[0, 0])  # the best token always stays


def test_top_p_matches_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for p in (0.3, 0.8, 0.95):
        expected = transformers.TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isinf(filter_logits(logits, top_p=p)), torch.isinf(expected))
    expected = transformers.TopKLogitsWarper(7)(None, logits.clone())
    assert torch.equal(torch.isinf(filter_logits(logits, top_k=7)), torch.isinf(expected))


def test_bad_options_are_config_errors_naming_the_field(decoder):
    ids = ids_of(1, 3)
    bad = {"temperature": -1.0, "top_k": 0, "top_p": 1.5, "max_new_tokens": -1, "repetition_penalty": -1.2,
           "seed": -5, "eos_token_id": [-1]}  # fmt: skip
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=f"invalid SamplingConfig: {field}"):
            decoder.generate(ids, **{field: value})
        with pytest.raises(ConfigError, match=field):
            decoder.generate_stream(ids, **{field: value})  # at the call, not at the first step
    with pytest.raises(ConfigError, match="attention_mask must be"):
        decoder.generate_stream(ids, attention_mask=torch.ones(1, 4))


def test_seed_gives_the_same_sample_whatever_the_global_rng(decoder):
    ids = ids_of(2, 6)
    options = dict(max_new_tokens=10, temperature=30.0, eos_token_id=[])  # the twin's logits are very peaked
    torch.manual_seed(1)
    first = decoder.generate(ids, seed=11, **options)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert torch.equal(decoder.generate(ids, seed=11, **options), first)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not drawn from
    samples = {tuple(decoder.generate(ids, seed=seed, **options)[0].tolist()) for seed in range(6)}
    assert len(samples) > 1
    torch.manual_seed(11)  # the seed's generator draws what the default generator seeded alike draws
    assert torch.equal(decoder.generate(ids, **options), first)


def test_repetition_penalty_marks_prompt_and_generated_ids(decoder):
    """Greedy under a penalty: the penalised ids are exactly the prompt's (padding left out) and those
    generated before, and a left-padded row equals the row alone."""
    ids = ids_of(1, 8, seed=9)
    free = decoder.generate(ids, max_new_tokens=16, eos_token_id=[])
    penalised = decoder.generate(ids, max_new_tokens=16, eos_token_id=[], repetition_penalty=5.0)
    assert not torch.equal(free, penalised)
    expected, seen = ids, set(ids[0].tolist())
    with torch.no_grad():
        for _ in range(16):  # the same rule by a full forward at every step
            logits = decoder(expected).logits[0, -1].float()
            for token in seen:
                logits[token] = logits[token] * 5.0 if logits[token] < 0 else logits[token] / 5.0
            token = int(logits.argmax())
            seen.add(token)
            expected = torch.cat((expected, torch.tensor([[token]])), dim=1)
    assert torch.equal(penalised, expected)
    padded = torch.cat((torch.full((1, 3), 7), ids), dim=1)  # 7 is a padding id here: never penalised
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)), dim=1)
    out = decoder.generate(padded, attention_mask=mask, max_new_tokens=16, eos_token_id=[], repetition_penalty=5.0)
    assert torch.equal(out[:, 3:], penalised)


@pytest.fixture(scope="module")
def llama_twin(tmp_path_factory):
    """A transformers LlamaForCausalLM and the same weights in tinyvlm."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    reference = randomize_(transformers.LlamaForCausalLM(config), seed=1, norm_offset=1.0).eval()
    return reference, save_twin(reference, tmp_path_factory.mktemp("llama"))


def _hf_generate(reference, ids, mask, new, **options):
    return reference.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0, **options
    )


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_greedy_equals_transformers(llama_twin, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor on greedy decoding, token for token, on one row and on
    a left-padded batch (transformers 5 leaves padding out of the penalty)."""
    reference, ours = llama_twin
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    single = ids[:1]
    expected = _hf_generate(reference, single, torch.ones_like(single), 24, do_sample=False, repetition_penalty=penalty)
    actual = ours.generate(single, max_new_tokens=24, eos_token_id=[], repetition_penalty=penalty)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, ours.generate(single, max_new_tokens=24, eos_token_id=[]))  # the penalty acted
    expected = _hf_generate(reference, ids, mask, 24, do_sample=False, repetition_penalty=penalty)
    actual = ours.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], repetition_penalty=penalty)
    assert torch.equal(actual, expected)


def test_sampling_order_equals_transformers(llama_twin):
    """Penalty, temperature, top-k, top-p in transformers' order: with the same random stream (our seed's
    generator = the default generator seeded alike), the same samples."""
    reference, ours = llama_twin
    ids = torch.randint(3, 101, (3, 7), generator=torch.Generator().manual_seed(5))
    options = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.4)
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = _hf_generate(reference, ids, torch.ones_like(ids), 16, do_sample=True, **options)
        actual = ours.generate(ids, max_new_tokens=16, eos_token_id=[], seed=seed, **options)
        assert torch.equal(actual, expected)


def test_resize_vocab_keeps_logits_and_ties(decoder):
    import copy

    model = copy.deepcopy(decoder)
    ids = ids_of(1, 8)
    with torch.no_grad():
        before = model(ids).logits
        model.resize_vocab(520)
        after = model(ids).logits
        mean = decoder.embed_tokens.weight.mean(0)
    assert model.vocab_size == 520 and model.config.vocab_size == 520
    assert torch.allclose(model.embed_tokens.weight[515], mean, atol=1e-6)
    assert torch.equal(after[..., :512], before)
    assert model.lm_head is None  # still tied: the new rows are the head's too
    model(torch.tensor([[515, 519]]))


def test_bf16_runs(decoder):
    import copy

    model = copy.deepcopy(decoder).to(torch.bfloat16)
    ids = ids_of(1, 20)
    with torch.no_grad():
        reference = decoder(ids).logits
        low = model(ids).logits
    assert low.dtype == torch.bfloat16
    assert rel_err(low, reference) < 0.1
    out = model.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (1, 25)


def test_single_row_with_left_padding_equals_unpadded(decoder):
    """One row with a padding mask takes the one-query decoding path with a mask."""
    ids = ids_of(1, 9, seed=7)
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)), dim=1)
    expected = decoder.generate(ids, max_new_tokens=20, eos_token_id=[])
    actual = decoder.generate(padded, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(actual[:, 4:], expected)


def test_rope_lookup_equals_forward(decoder):
    positions = torch.tensor([[0, 3, 17, 40], [5, 5, 6, 90]])
    for rotary in decoder.rotary.values():
        for table, direct in zip(rotary.lookup(positions[:, :2], 18, torch.float32), rotary(positions[:, :2], torch.float32)):
            assert torch.allclose(table, direct, rtol=0, atol=1e-6)
        for table, direct in zip(rotary.lookup(positions, 91, torch.float32), rotary(positions, torch.float32)):
            assert torch.allclose(table, direct, rtol=0, atol=1e-6)  # the grown table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rms_norm_is_the_references_bit_for_bit(family, dtype):
    """`layers.RMSNorm` (through ``F.rms_norm``) equals transformers' norms exactly, values and gradients."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tinyvlm.layers import RMSNorm

    torch.manual_seed(0)
    ours = RMSNorm(48, 1e-6, unit_offset=family == "gemma3").to(dtype)
    theirs = (Gemma3RMSNorm(48, eps=1e-6) if family == "gemma3" else LlamaRMSNorm(48, eps=1e-6)).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48) * 0.2 + (0.0 if family == "gemma3" else 1.0))
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(3, 5, 48) * 4).to(dtype).requires_grad_()
    upstream = torch.randn(3, 5, 48).to(dtype)
    results = []
    for norm in (ours, theirs):
        out = norm(x)
        results.append((out, *torch.autograd.grad(out, (x, norm.weight), upstream)))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_generate_never_changes_the_weights(decoder):
    """The decoding layouts are the explicit prepare_for_inference step: generating (as training's evaluation
    does) leaves every parameter's storage, strides and values as they were."""
    import copy

    model = copy.deepcopy(decoder)
    for param in model.parameters():
        param.data = param.data.contiguous()
    before = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()}
    model.generate(ids_of(2, 7), max_new_tokens=5, eos_token_id=[], repetition_penalty=1.2)
    list(model.generate_stream(ids_of(1, 7), max_new_tokens=3, temperature=1.0, seed=0))
    for name, p in model.named_parameters():
        pointer, stride, value = before[name]
        assert (p.data_ptr(), p.stride()) == (pointer, stride) and torch.equal(p, value), name
