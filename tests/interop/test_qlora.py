"""QLoRA composition (`tinyvlm.interop.qlora`): LoRA on a base whose linears are weight-only quantized layers
(not ``nn.Linear``). The quantized layer here is a stand-in with the interface of one (int8 weights with
per-output-channel scales, ``in_features`` / ``out_features``); the adapter trains, saves and loads on it.
The last tests run the same on tinyvlm's own int8 / int4 (`tinyvlm.inference.quantize`), through ``tinyvlm train``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinyvlm
from tinyvlm.errors import ConfigError
from tinyvlm.interop.lora import add_lora, lora_layers, merge_adapter, save_adapter
from tinyvlm.interop.lora_settings import LoraSettings

pytest.importorskip("peft")


class Int8Linear(nn.Module):
    """Weight-only int8: ``x (scale * W_int8)^T + b``, symmetric per-output-channel scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenProduct.apply(x, self)


class FrozenProduct(torch.autograd.Function):
    """The product computed without autograd (as an integer kernel without a derivative would), and the input
    gradient ``dy W`` from the dequantized weight: what a quantized layer must give for QLoRA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        with torch.no_grad():
            return F.linear(x, layer.dequantize().to(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


def quantized(vlm):
    """A copy of ``vlm`` whose decoder block linears are `Int8Linear`."""
    vlm = copy.deepcopy(vlm)
    for name, module in list(vlm.decoder.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            parent, _, leaf = name.rpartition(".")
            setattr(vlm.decoder.get_submodule(parent), leaf, Int8Linear(module))
    return vlm


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-vlm", dtype=torch.float32)
    with torch.no_grad():
        for weight in vlm.decoder.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape) * 0.2)  # the same values in any weight layout
    return vlm.save_pretrained(tmp_path_factory.mktemp("base") / "model")


def test_lora_trains_saves_and_loads_on_a_quantized_base(base: Path, tmp_path: Path) -> None:
    fp = tinyvlm.load_vlm(base)
    q = quantized(fp)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, unquantized = q(ids).logits, fp(ids).logits
    assert not torch.equal(before, unquantized)  # really quantized
    rounding = ((before - unquantized).abs().max() / unquantized.abs().max()).item()
    add_lora(q, LoraSettings(rank=4, targets=("q", "v", "down")))
    layers = lora_layers(q)
    assert len(layers) == 3 * q.decoder.config.num_layers
    assert {type(layer).__name__ for layer in layers.values()} == {"QuantLoraLinear"}
    assert all(isinstance(layer.get_base_layer(), Int8Linear) for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(q(ids).logits, before)  # B = 0

    int8_before = {n: b.clone() for n, b in q.named_buffers() if b.dtype == torch.int8}
    trainable = [p for p in q.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(q(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(b, int8_before[n]) for n, b in q.named_buffers() if b.dtype == torch.int8)
    assert any(p.abs().max() > 0 for n, p in q.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        trained = q(ids).logits
    assert not torch.equal(trained, before)

    folder = save_adapter(q, tmp_path / "adapter")
    again = quantized(fp)  # a fresh quantized base
    from tinyvlm.interop.lora import load_adapter

    load_adapter(again, folder)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained)
    with pytest.raises(ConfigError, match="merge it into the full-precision base"):
        merge_adapter(again)

    # the usual QLoRA deployment: the adapter applies to (and merges into) the full-precision base
    merged = merge_adapter(tinyvlm.load_vlm(base, adapter=folder))
    with torch.no_grad():
        full = merged(ids).logits
    assert not torch.equal(full, unquantized)
    error = ((full - trained).abs().max() / trained.abs().max()).item()
    print(f"QLoRA against its merge into the fp base: {error:.3f}; int8 rounding alone: {rounding:.3f}")
    assert error < 1.5 * rounding  # only the int8 rounding differs


def test_quantized_weights_do_not_export(base: Path, tmp_path: Path) -> None:
    from tinyvlm.interop.transformers import save_hf_decoder, save_idefics3

    q = quantized(tinyvlm.load_vlm(base))
    with pytest.raises(ConfigError, match=r"linears are quantized \(Int8Linear\)"):
        save_idefics3(q, tmp_path / "vlm")
    add_lora(q, LoraSettings(rank=2))
    with pytest.raises(ConfigError, match=r"LoRA adapter: merge it first .*; its linears are quantized \(Int8Linear\):"):
        save_hf_decoder(q.decoder, tmp_path / "decoder")


def test_gradients_through_the_quantized_base_equal_those_of_its_dequantized_weights(base: Path) -> None:
    """The quantized kernels have no derivative: the gradient reaching earlier layers is dy W with W dequantized,
    the same as through a float layer holding the dequantized weights."""
    q = quantized(tinyvlm.load_vlm(base))
    plain = copy.deepcopy(q)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent), leaf, linear)
    settings = LoraSettings(rank=4, targets=("q", "o", "up"))
    for model in (q, plain):
        torch.manual_seed(3)
        add_lora(model, settings)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (q, plain):
        loss = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".lora_" in n})
    assert grads[0].keys() == grads[1].keys()
    first = "decoder.layers.0.self_attn.q_proj.lora_A.default.weight"  # reached only through layer 1's base layers
    assert grads[0][first].abs().max() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------ on tinyvlm's own quantization


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinyvlm.evaluation.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=24, seed=1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_command_on_a_quantized_base(mode: str, base: Path, shapes: Path, tmp_path: Path) -> None:
    """``tinyvlm train --model X --lora R --quantize MODE``: the decoder is quantized as it is read, the adapter
    (and the projector) train through it, the loss falls, and the adapter loads back on the quantized base."""
    import json

    from safetensors.torch import load_file

    from tinyvlm.cli import main
    from tinyvlm.interop.qlora import QuantLoraLinear
    from tinyvlm.inference.quantize import QuantizedLinear

    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--data", str(shapes), "--output", str(run), "--lora", "8",
                 "--quantize", mode, "--max-steps", "12", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-2",
                 "--log-every", "1", "--checkpoint-every", "0", "--eval-samples", "0", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B.weight"))

    plain = tinyvlm.load_vlm(base, quantize=mode)
    adapted = tinyvlm.load_vlm(base, adapter=run / "adapter", quantize=mode)
    layer = adapted.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoraLinear) and isinstance(layer.get_base_layer(), QuantizedLinear)
    assert layer.get_base_layer().mode == mode and adapted.config.quantization.mode == mode
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(adapted(ids).logits, plain(ids).logits)  # the trained adapter applies
        again = tinyvlm.load_vlm(base, adapter=run / "adapter", quantize=mode)
        assert torch.equal(again(ids).logits, adapted(ids).logits)


def test_projector_trains_on_a_quantized_decoder(base: Path, shapes: Path, tmp_path: Path) -> None:
    """Without LoRA, the default parts (the projector) train through a quantized, frozen decoder."""
    result = tinyvlm.train(model=str(base), data=shapes, output=tmp_path / "run", quantize="int8", max_steps=2,
                           batch_size=4, grad_accum=1, checkpoint_every=0, eval_samples=0, progress=False)
    trained = tinyvlm.load_vlm(result.model_dir)
    original = tinyvlm.load_vlm(base)
    assert trained.config.quantization.mode == "int8"
    changed = [not torch.equal(p, original.projector.get_parameter(n)) for n, p in trained.projector.named_parameters()]
    assert any(changed)
