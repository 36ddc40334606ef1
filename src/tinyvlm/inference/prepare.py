"""`prepare_for_inference`: a decoder (or a VLM's decoder) made fast for decoding, explicitly and in one place.

The model files hold the plain forwards (`tinyvlm.layers`). This step gives the same modules their decoding
subclasses, which share every parameter and buffer and change only how the products are computed:

==================  =====================  ======================================================================
module              becomes                what changes
==================  =====================  ======================================================================
``nn.Linear``       `SplitLinear`          one-row fp32 CPU products split over the threads (`split_linear`)
`Embedding`         `DecodingEmbedding`    the tied LM head's product split the same way
`Attention`         `DecodingAttention`    q/k/v as one fused product; one CPU query by `attend_one_query`
`GatedMLP`          `DecodingGatedMLP`     gate/up as one fused product
==================  =====================  ======================================================================

It then stores the weights in the layouts fastest for decoding on their device and dtype (quantized matrices
in their kernels' tilings), fuses the products that read the same input (`FusedLinears`) and gives the decoder
its thread choice (`ThreadChoice`: the ``threads`` given, or tuned step by step), which generation enters
around each step. Shapes, values, parameter names and ``state_dict()`` stay the same; calling it again
changes nothing (``threads`` given again replaces the thread choice). Training works on a prepared model:
the fused products and the attention shortcut apply only without autograd, and the parameters stay the ones
an optimizer holds.

Every door of `tinyvlm.api` returns its models prepared, so that the same weights give the same bits
whichever door they came through (a layout changes the order in which a product of a few rows adds up).
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyvlm.decoders.base import TransformerDecoder
from tinyvlm.errors import ConfigError
from tinyvlm.inference.products import (
    FusedLinears,
    SplitLinear,
    attend_one_query,
    split_linear,
    store_for_decoding,
)
from tinyvlm.inference.quantize import QuantizedMatrix
from tinyvlm.inference.threads import ThreadChoice
from tinyvlm.layers import Attention, Embedding, GatedMLP, LayerCache
from tinyvlm.vlm.model import VLM

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class DecodingEmbedding(Embedding):
    """`Embedding` whose tied-head product goes through `split_linear`."""

    def as_head(self, hidden: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return F.linear(hidden, self.weight)
        return split_linear(hidden, self.weight)


class DecodingAttention(Attention):
    """`Attention` with q/k/v as one fused product (``fused``, when it applies: `FusedLinears.outputs`) and one
    query of one sequence on CPU attended by `attend_one_query`, which skips SDPA's dispatch."""

    fused: FusedLinears | None = None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: LayerCache | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.heads(*FusedLinears.outputs(self, QKV, x), rope, cache)
        if B == 1 and T == 1 and x.device.type == "cpu":
            out = attend_one_query(q[0, :, 0], k[0], v[0], self.scale, None if mask is None else mask[0, 0, 0])
            return self.o_proj(out.view(1, 1, self.num_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DecodingGatedMLP(GatedMLP):
    """`GatedMLP` with gate and up as one fused product (when it applies: `FusedLinears.outputs`)."""

    fused: FusedLinears | None = None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = FusedLinears.outputs(self, GATE_UP, x)
        return self.down_proj(self.act(gate) * up)


#: Each plain module type and its decoding subclass (exact types: a replacement module, e.g. a LoRA layer or
#: a quantized linear, keeps its own class).
DECODING_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SplitLinear,
    Embedding: DecodingEmbedding,
    Attention: DecodingAttention,
    GatedMLP: DecodingGatedMLP,
}

Model = TypeVar("Model", bound=nn.Module)


@torch.no_grad()
def prepare_for_inference(model: Model, *, threads: int | None = None) -> Model:
    """Prepare a decoder, or a VLM's decoder, for decoding (module docstring), in place; returns ``model``
    in eval mode. ``threads``: the intra-op thread count of its generation steps, set around each step and
    restored after it (None: chosen step by step, see `tinyvlm.inference.threads`)."""
    decoder = model.decoder if isinstance(model, VLM) else model
    if not isinstance(decoder, TransformerDecoder):
        raise ConfigError(f"prepare_for_inference takes a VLM or a transformer decoder, not a {type(model).__name__}")
    for module in decoder.modules():
        decoding = DECODING_CLASSES.get(type(module))
        if decoding is not None:
            module.__class__ = decoding  # the same object, parameters and names; the decoding methods
    _store_weights(decoder)
    for module in decoder.modules():
        if isinstance(module, (DecodingAttention, DecodingGatedMLP)):
            names = QKV if isinstance(module, DecodingAttention) else GATE_UP
            if module.fused is None or not module.fused.current(module):
                module.fused = FusedLinears.of(module, names)
    if threads is not None or decoder.step_scope is None:
        decoder.step_scope = ThreadChoice(threads)
    return model.eval()


def _store_weights(decoder: TransformerDecoder) -> None:
    """Every matrix in its decoding layout, except those already fused (views of a fused matrix, which is in
    that layout); quantized ones in their kernels' tilings (an LM head takes few rows at a time)."""
    head = decoder.embed_tokens if decoder.lm_head is None else decoder.lm_head
    fused = {
        id(member)
        for module in decoder.modules()
        if isinstance(module, (DecodingAttention, DecodingGatedMLP)) and module.fused is not None
        and module.fused.current(module)
        for member in module.fused.parts
    }  # fmt: skip
    for module in decoder.modules():
        if id(module) in fused:
            continue
        if isinstance(module, QuantizedMatrix):
            module.tile_for_kernels(few_rows=module is head)
        elif isinstance(module, nn.Linear) or module is head:
            store_for_decoding(module.weight)


@torch.no_grad()
def prepare_for_training(model: Model) -> Model:
    """Undo the layouts of `prepare_for_inference` that training reads slower: every float matrix of the
    decoder row-major in storage of its own (no fused matrix), quantized ones in the plain tiling, which a
    training step's many rows and its backward read (`tinyvlm.inference.quantize`). In place; the decoding
    subclasses and the thread choice stay (with autograd they compute the plain products). Returns ``model``.
    `tinyvlm.train` takes this step on the model a door gave it."""
    decoder = model.decoder if isinstance(model, VLM) else model
    if not isinstance(decoder, TransformerDecoder):
        raise ConfigError(f"prepare_for_training takes a VLM or a transformer decoder, not a {type(model).__name__}")
    for module in decoder.modules():
        if isinstance(module, (DecodingAttention, DecodingGatedMLP)):
            module.fused = None
    for module in decoder.modules():
        if isinstance(module, QuantizedMatrix):
            module.to_plain()
        elif isinstance(module, nn.Linear) or module is decoder.embed_tokens:
            weight = module.weight
            shared = weight.untyped_storage().nbytes() != weight.numel() * weight.element_size()
            if not weight.is_meta and (shared or not weight.is_contiguous()):
                weight.data = weight.data.clone(memory_format=torch.contiguous_format)
    return model
