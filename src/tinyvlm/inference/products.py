"""The products of a decoding step, made fast without changing a bit of their results.

A decoding step multiplies every weight matrix by one vector. Three things make that faster on CPU, and
`tinyvlm.inference.prepare` applies them to a decoder through the subclasses below:

* `split_linear`: MKL runs a one-row product on one thread; viewing the weight's rows as one block per
  thread and multiplying them as one batched product spreads it over every thread, bit for bit the same.
* Weight layouts (`column_major_for_decoding`): for fp32 on CPU, MKL reads a wide ``W [out, in]``
  (``out >= in``: the LM head, q, gate, up) 1.3-1.9x faster stored column-major, a narrow one row-major (see
  docs/decoders.md, "Performance"); bf16 (oneDNN) is fastest row-major throughout. A layout changes the
  order in which a product of a few rows adds up, so every door (`tinyvlm.api`) returns its models in the
  same layouts: the same weights then give the same bits whichever door they came through.
* `FusedLinears`: the products that read the same input (q/k/v, gate/up) as one matrix each (one kernel call
  instead of several, over a larger matrix, which reads faster).

`attend_one_query` is the attention of one decoding query without the dispatch and reshapes of SDPA.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyvlm.inference.quantize import QuantizedLinear, stack_rows

#: Matrices below this many elements (256 KiB in fp32) are multiplied in one piece: splitting them costs
#: more than it saves (measured on a 2-core EPYC, see docs/decoders.md, "Performance").
SPLIT_MIN_NUMEL = 1 << 16


def split_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias), bit for bit, using every intra-op thread when ``x`` is one fp32 row
    on CPU (a decoding step).

    MKL runs a one-row product on a single thread, so decoding, which is bound by reading the weights, used
    one core. Here the rows of ``weight`` are viewed as ``n = torch.get_num_threads()`` equal blocks (a strided
    view of the parameter itself: no copy, nothing to keep in sync with training) and multiplied as one
    batch-``n`` ``bmm``, which ATen spreads over its threads. Every output is the same dot product computed
    by the same kernel in the same order as in the unsplit product, hence identical.
    """
    out_features, in_features = weight.shape
    parts = torch.get_num_threads()
    if (
        parts < 2
        or x.numel() != in_features
        or x.device.type != "cpu"
        or weight.dtype != torch.float32
        or x.dtype != torch.float32
        or out_features % parts
        or weight.numel() < SPLIT_MIN_NUMEL
    ):
        return F.linear(x, weight)
    rows, row_stride, col_stride = out_features // parts, weight.stride(0), weight.stride(1)
    blocks = weight.as_strided((parts, rows, in_features), (rows * row_stride, row_stride, col_stride))
    out = torch.bmm(x.reshape(1, 1, in_features).expand(parts, 1, in_features), blocks.transpose(1, 2))
    return out.view(*x.shape[:-1], out_features)


class SplitLinear(nn.Linear):
    """An ``nn.Linear`` whose bias-free products go through `split_linear`. Under ``torch.compile`` it is the
    plain product: the split is for eager CPU decoding, and its thread query would break the graph."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        return split_linear(x, self.weight)


def column_major_for_decoding(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether a ``[out, in]`` weight is read fastest column-major when decoding: fp32 on CPU with ``out >= in``
    (MKL's one-row product; module docstring)."""
    return device.type == "cpu" and dtype == torch.float32 and out_features >= in_features


@torch.no_grad()
def store_for_decoding(weight: Tensor) -> None:
    """Give ``weight`` (a parameter, in place: the same object) the layout `column_major_for_decoding` picks."""
    column_major = column_major_for_decoding(weight.device, weight.dtype, *weight.shape)
    if weight.is_meta or column_major == (weight.stride(0) == 1):
        return
    weight.data = weight.data.t().contiguous().t() if column_major else weight.data.contiguous()


class FusedLinears:
    """Linear layers of one module that read the same input (q/k/v, gate/up), multiplied as one matrix when
    decoding.

    `of` concatenates the parts' weights into one matrix and makes each part's weight a view of its rows:
    nothing is stored twice, and the parameters, their names, values and training are unchanged. Parts that
    cannot share a product with their neighbours (a different kind or quantization mode, a hook, a replacement
    module such as a LoRA layer) keep their own. `outputs` uses the fused products only without autograd
    (decoding) and only while every part is still the module, with the storage, it was fused from; anything
    else (training, a move, a replaced module) takes the parts one by one, which is the same arithmetic.
    """

    def __init__(self, names: tuple[str, ...], parts: list[nn.Module], groups: list[tuple[Any, list[int]]]) -> None:
        self.names, self.parts, self.groups = names, parts, groups
        self.pointers = [part.weight.data_ptr() for part in parts]

    @staticmethod
    def of(owner: nn.Module, names: tuple[str, ...]) -> "FusedLinears | None":
        """Fuse ``owner``'s layers ``names`` (in place, see the class docstring); None when no two can be."""
        parts = [getattr(owner, name) for name in names]
        groups: list[tuple[Any, list[int]]] = []
        for kind, same in itertools.groupby(parts, _fusable_kind):
            run = list(same)
            stacked = None
            if kind is not None and len(run) > 1:
                stacked = (stack_rows if isinstance(run[0], QuantizedLinear) else _stack_linears)(run)
            if stacked is None:
                groups.extend((part, [part.out_features]) for part in run)
            else:
                groups.append((stacked, [part.out_features for part in run]))
        return FusedLinears(names, parts, groups) if len(groups) < len(parts) else None

    @staticmethod
    def outputs(owner: nn.Module, names: tuple[str, ...], x: Tensor) -> list[Tensor]:
        """``[layer(x) for layer in names]``, by ``owner.fused`` when it applies (class docstring)."""
        fused: FusedLinears | None = getattr(owner, "fused", None)
        if fused is not None and not torch.is_grad_enabled() and fused.current(owner):
            out: list[Tensor] = []
            for product, sizes in fused.groups:
                y = product(x)
                out.extend(y.split(sizes, dim=-1) if len(sizes) > 1 else (y,))
            return out
        return [getattr(owner, name)(x) for name in names]

    def current(self, owner: nn.Module) -> bool:
        return all(getattr(owner, name) is part for name, part in zip(self.names, self.parts)) and all(
            part.weight.data_ptr() == pointer for part, pointer in zip(self.parts, self.pointers)
        )


def _fusable_kind(module: nn.Module) -> tuple | None:
    """What must match for layers to share a product; None for a layer that keeps its own."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module) in (nn.Linear, SplitLinear):
        return ("float", module.weight.dtype, module.weight.device, module.in_features, module.bias is None)
    if type(module) is QuantizedLinear:
        return ("quantized", module.weight.device, module.cols, module.mode, module.tiling)
    return None


def _stack_linears(parts: list[nn.Module]) -> SplitLinear:
    """One linear layer whose rows are the parts' rows (and biases) in order, stored in the layout
    `column_major_for_decoding` picks for its shape; each part's weight (and bias) becomes a view of its rows."""
    first = parts[0].weight
    out_features, in_features = sum(p.out_features for p in parts), first.shape[1]
    stacked = SplitLinear(in_features, out_features, bias=parts[0].bias is not None, device="meta")
    shape = (out_features, in_features)
    if column_major_for_decoding(first.device, first.dtype, out_features, in_features):
        weight = torch.empty(shape[::-1], dtype=first.dtype, device=first.device).t()
    else:
        weight = torch.empty(shape, dtype=first.dtype, device=first.device)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    start = 0
    for part in parts:
        rows = slice(start, start + part.out_features)
        weight[rows] = part.weight.detach()
        part.weight.data = weight[rows]
        if stacked.bias is not None:
            part.bias.data = stacked.bias.data[rows]
        start += part.out_features
    return stacked


def attend_one_query(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Attention of a single query token: ``q [H, d]`` over ``k, v [H_kv, S, d]`` (query head ``h`` reads
    key/value head ``h // (H / H_kv)``), ``mask [S]`` of allowed keys or None -> ``[H, d]``.

    This is the decoding step of one sequence: two small batched products, one per key/value head, with the
    query heads of its group as the rows (no key/value repetition). It skips SDPA's dispatch and reshapes,
    which cost more than this arithmetic; a loop over heads would cost three ops per head.
    """
    kv_heads, _, head_dim = k.shape
    scores = torch.bmm((q * scale).view(kv_heads, -1, head_dim), k.transpose(1, 2))  # [H_kv, group, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.bmm(scores.softmax(-1), v).view(q.shape)
