"""`prepare_for_inference` / `prepare_for_training` (`tinyvlm.inference.prepare`): the decoding subclasses,
weight layouts and fused products keep names, values and training; the products they use are the plain ones,
bit for bit (`tinyvlm.inference.products`); the step is idempotent and `prepare_for_training` takes the
training layouts back."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "decoders"))

from decoder_twins import randomize_, rel_err  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.inference import products  # noqa: E402
from tinyvlm.inference.prepare import (  # noqa: E402
    DecodingAttention,
    DecodingGatedMLP,
    prepare_for_inference,
    prepare_for_training,
)
from tinyvlm.inference.products import SPLIT_MIN_NUMEL, SplitLinear, split_linear  # noqa: E402
from tinyvlm.inference.quantize import QuantizedMatrix  # noqa: E402
from tinyvlm.layers import Attention, GatedMLP  # noqa: E402


@pytest.fixture(scope="module", params=["test-llama", "test-gemma3"])
def decoder(request):
    torch.manual_seed(0)
    model = tinyvlm.build_decoder(request.param)
    return randomize_(model, seed=5, norm_offset=1.0 if request.param == "test-llama" else 0.0)


def ids_of(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_decoding_layout_keeps_names_values_and_training(decoder):

    model = copy.deepcopy(decoder)
    model.embed_tokens.weight.data = model.embed_tokens.weight.data.contiguous()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = ids_of(1, 12)
    with torch.no_grad():
        logits = model(ids).logits
    prepare_for_inference(model)
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[name], value) for name, value in before.items())
    attention = model.layers[0].self_attn
    q, k = attention.q_proj.weight, attention.k_proj.weight
    assert model.embed_tokens.weight.stride(0) == 1 and q.stride(0) == 1  # wide: column-major
    assert model.layers[0].mlp.down_proj.weight.stride(1) == 1  # narrow: row-major
    (qkv, sizes), = attention.fused.groups  # q, k, v: one wide matrix; the parts are views of its rows
    assert sizes == [q.shape[0], k.shape[0], attention.v_proj.weight.shape[0]] and qkv.weight.stride(0) == 1
    assert k.data_ptr() == qkv.weight[q.shape[0]].data_ptr()
    with torch.no_grad():
        assert rel_err(model(ids).logits, logits) <= 1e-6
    model(ids).logits.logsumexp(-1).mean().backward()
    assert q.grad is not None and q.grad.shape == q.shape and q.grad.abs().sum() > 0
    low = model.to(torch.bfloat16)
    prepare_for_inference(low)
    assert low.embed_tokens.weight.stride(1) == 1  # bf16: row-major


def test_fused_projections_decode_as_the_parts(decoder):
    """q/k/v and gate/up fused by prepare_for_inference give the logits of the separate products (within
    float rounding) and the same greedy tokens; a replaced part, a move or autograd takes the parts."""

    model = copy.deepcopy(decoder)
    ids = ids_of(1, 12)
    with torch.no_grad():
        separate = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, eos_token_id=[])
        prepare_for_inference(model)
        mlp = model.layers[0].mlp
        assert [sizes for _, sizes in mlp.fused.groups] == [[mlp.gate_proj.out_features, mlp.up_proj.out_features]]
        assert rel_err(model(ids).logits, separate) <= 1e-6
        assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=[]), tokens)

        calls = []
        mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
        model(ids)
        assert calls == []  # fused: the part itself is not called
        for layer in model.layers:  # replaced (as a wrapper would), here by a hooked copy
            replacement = copy.deepcopy(layer.mlp.up_proj)
            replacement.weight.data = replacement.weight.data.clone()
            layer.mlp.up_proj = replacement
        assert rel_err(model(ids).logits, separate) <= 1e-6 and len(calls) == 1
        assert not mlp.fused.current(mlp)

        moved = model.to(torch.float64)  # new storage for every part: the fusions no longer apply
        assert not moved.layers[0].self_attn.fused.current(moved.layers[0].self_attn)
        assert rel_err(moved(ids.clone()).logits.float(), separate) <= 1e-6
    prepare_for_inference(moved)  # fuses again, except the hooked up_proj, which keeps its own product
    assert moved.layers[0].self_attn.fused.current(moved.layers[0].self_attn)
    assert moved.layers[0].mlp.fused is None and moved.layers[1].mlp.fused is not None


@pytest.fixture
def threads():
    """Set the intra-op thread count for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("column_major", [False, True])
def test_split_linear_is_bit_identical(threads, parts, column_major):
    threads(parts)
    torch.manual_seed(0)
    weight = torch.randn(6 * 512, SPLIT_MIN_NUMEL // (6 * 512) + 7)
    if column_major:
        weight = weight.t().contiguous().t()
    for x in (torch.randn(1, weight.shape[1]), torch.randn(1, 1, weight.shape[1])):
        expected = torch.nn.functional.linear(x, weight)
        assert split_linear(x, weight).shape == expected.shape
        assert torch.equal(split_linear(x, weight), expected)


def test_split_decoding_equals_one_thread(decoder, threads, monkeypatch):
    """Every product of a decoding step split over threads (the tiny twin's matrices are below the size
    where that pays, so the threshold is lowered): logits bit-identical to one thread, same greedy tokens."""
    ids = ids_of(1, 20)
    prepare_for_inference(decoder)  # as build_decoder does (the layout picks the kernel)

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cache = decoder.new_cache(1, 21)
            decoder(ids[:, :-1], cache=cache)
            step = decoder(ids[:, -1:], cache=cache).logits
        return step, decoder.generate(ids, max_new_tokens=12, eos_token_id=[])

    threads(1)
    step, tokens = decode()
    monkeypatch.setattr(products, "SPLIT_MIN_NUMEL", 0)
    threads(2)
    split_step, split_tokens = decode()
    assert torch.equal(split_step, step)
    assert torch.equal(split_tokens, tokens)


def test_the_plain_modules_become_their_decoding_subclasses_once(decoder):
    model = copy.deepcopy(decoder)
    prepare_for_training(model)
    ids = ids_of(1, 9)
    with torch.no_grad():
        logits = model(ids).logits
    layer = model.layers[0]
    assert type(layer.self_attn) is DecodingAttention and type(layer.mlp) is DecodingGatedMLP
    assert isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, GatedMLP)
    assert type(layer.self_attn.o_proj) is SplitLinear
    assert layer.self_attn.fused is None  # prepare_for_training dropped the fusions
    prepare_for_inference(model)
    fused, scope = layer.self_attn.fused, model.step_scope
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    prepare_for_inference(model)  # idempotent: the same fusions, storage and thread choice
    assert fused is not None and layer.self_attn.fused is fused and model.step_scope is scope
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage
    with torch.no_grad():
        assert rel_err(model(ids).logits, logits) <= 1e-6


def test_prepare_for_training_takes_the_training_layouts_back(decoder):
    model = copy.deepcopy(decoder)
    prepare_for_inference(model)
    q = model.layers[0].self_attn.q_proj.weight
    assert q.stride(0) == 1 and model.layers[0].self_attn.fused is not None  # column-major, fused
    prepare_for_training(model)
    for name, param in model.named_parameters():
        assert param.is_contiguous(), name
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), f"{name} shares storage"
    assert model.layers[0].self_attn.fused is None and model.layers[0].mlp.fused is None
    quantized = tinyvlm.build_decoder("test-llama", pretrained=False, quantize="int4")
    assert {m.tiling for m in quantized.modules() if isinstance(m, QuantizedMatrix)} > {"plain"}
    prepare_for_training(quantized)
    assert {m.tiling for m in quantized.modules() if isinstance(m, QuantizedMatrix)} == {"plain"}


def test_only_decoders_and_vlms_are_prepared():
    with pytest.raises(tinyvlm.ConfigError, match="prepare_for_inference takes a VLM or a transformer decoder, not a Linear"):
        prepare_for_inference(torch.nn.Linear(2, 2))
