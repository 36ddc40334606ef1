"""Weight-only int8 / int4 quantization of decoders, computed by PyTorch's own kernels.

What is quantized (`tinyvlm.config.QuantizationConfig`): every linear layer of the decoder blocks (q, k, v,
o, gate, up, down), the token-embedding table (which a tied LM head shares) and an untied LM head.
``quantize="int8"`` stores them all in int8; ``quantize="int4"`` stores q, k, o and down in int4 and keeps
v, gate, up and the embedding in int8 (the ones whose int4 error cost the most perplexity, see
`QuantizationConfig.for_mode`). Norms, RoPE, the KV cache and all activations stay floating point.

Layout of a quantized matrix ``W [rows, cols]`` (a weight ``[out, in]`` or an embedding table
``[vocab, dim]``), as `QuantizedMatrix` holds it and ``model.safetensors`` stores it under the module's name:

* int8, one scale per row (output channel), symmetric::

      NAME.weight        int8  [rows, cols]
      NAME.weight_scale  bf16  [rows]                W[n, k] ~= weight[n, k] * weight_scale[n]

* int4, one scale and zero per group of ``G`` consecutive columns (input channels), asymmetric::

      NAME.weight             uint8 [rows, cols / 2]  byte j of row n: q[n, 2j] in its low nibble, q[n, 2j+1] high
      NAME.weight_scale_zero  bf16  [cols / G, rows, 2]  W[n, k] ~= (q[n, k] - 8) * s + z, (s, z) = [k // G, n]

  (``q`` in 0..15; the scale/zero layout is the one the int4 kernels read). Scales and zeros are rounded to
  bf16 *before* the weights are quantized against them, so what is stored is exactly what the kernels use.

Kernels (`QuantizedMatrix.matmul`): ``aten._weight_int4pack_mm_for_cpu`` on CPU and
``aten._weight_int4pack_mm`` on CUDA for int4, on the tiled layouts ``_convert_weight_to_int4pack[_for_cpu]``
make; ``aten._weight_int8pack_mm`` for int8. Activations enter the kernels in bf16 (their fast path: the
int8 kernel runs an fp32 input several times slower) and the result is cast back. These kernels are built
for few rows: a product of `MANY_ROWS` or more rows (a prompt, a training batch) with a plain-layout matrix
dequantizes it a block of rows at a time and uses the fp32 GEMM instead.

The LM head, whose products take one row per sequence, is prepared on CPU in int8 as "nibbles", multiplied
by the int4 kernel: with ``u = w + 128 = 16 h + l`` (``h, l`` in 0..15), ``s w = 16 s (h - 8) + (s (l - 8) +
8 s)``, so the row ``[h | l]`` of ``2 cols`` 4-bit values, with scale ``16 s`` (zero 0) over the ``h`` groups
and scale ``s`` (zero ``8 s``) over the ``l`` groups, times ``[x | x]`` is ``x . (s w)``, exactly (the kernel
dequantizes in fp32). Same bytes per weight; at one row the int4 kernel streams them 1.3-1.4x faster than the
int8 kernel, at many rows it is slower (``python benchmarks/matmul_kernels.py [--rows]``).

The tiled layouts (a matrix's ``tiling``) are made by `QuantizedMatrix.tile_for_kernels` (which
`tinyvlm.inference.prepare_for_inference` calls). ``state_dict()`` always returns the plain layout above, so
saving after preparing writes the documented layout.

Quantizing at load (`LoadQuantizer`, used by `tinyvlm.weights.load_checkpoint`): each matrix is read from
the safetensors file in blocks of rows with plain file reads (no memory map, whose touched pages would stay
resident) and quantized block by block, so the fp32 checkpoint is never held in memory: the peak is the
quantized model plus one block (see ``benchmarks/load_memory.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyvlm.config import QUANT_MODES, QuantizationConfig
from tinyvlm.errors import ConfigError
from tinyvlm.weights import FileRows

#: The dtype activations are cast to for the kernels, and the dtype of scales and zeros.
KERNEL_DTYPE = torch.bfloat16
#: Values read and quantized at a time (4 MB of fp32): the quantization's temporaries are a few times this.
BLOCK_VALUES = 1 << 20
#: The CPU int4 kernel tiles rows in blocks of this many (`_convert_weight_to_int4pack_for_cpu`).
CPU_INT4_TILE = 64
#: From this many rows on, a product of a plain int8 matrix dequantizes it a block of rows at a time and uses
#: the fp32 GEMM: the int8 kernel's time grows with the rows. Gemma-3 270M's blocks, all layers, kernel /
#: dequantized: 32 rows 81 / 111 ms, 64 rows 154 / 180 (another run: 113 / 114), 128 rows 219 / 153, 512 rows
#: 874 / 464 (``python benchmarks/matmul_kernels.py --rows 1 8 32 64 128 512``).
MANY_ROWS = 64


def check_quantize(mode: str | None, *, dtype: torch.dtype | None, device: torch.device | None) -> QuantizationConfig | None:
    """The `QuantizationConfig` that ``quantize=mode`` means, after checking the target can run it."""
    if mode is None:
        return None
    config = QuantizationConfig.for_mode(mode)
    check_target(config, dtype=dtype, device=device)
    return config


def check_target(config: QuantizationConfig, *, dtype: torch.dtype | None, device: torch.device | None) -> None:
    """Refuse devices and dtypes the kernels do not cover, with what to do instead."""
    kind = torch.device(device or "cpu").type
    if kind not in ("cpu", "cuda"):
        raise ConfigError(
            f"quantize={config.mode!r} runs on cpu and cuda; this model is on {kind}. "
            "Load it with device='cpu' (or a CUDA device), or without quantize."
        )
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(
            f"quantize={config.mode!r} keeps activations in float32 or bfloat16, not {dtype}; "
            "pass dtype=torch.float32 (the default for checkpoints in fp32) or torch.bfloat16"
        )


# ---------------------------------------------------------------------------------------- quantization math


def quantize_int8(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows [n, k]`` (float) -> int8 ``[n, k]`` and a bf16 scale per row (symmetric, max |w| -> 127)."""
    rows = rows.float()
    scale = (rows.abs().amax(1) / 127).clamp(min=1e-12).to(KERNEL_DTYPE)
    q = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


#: int4 search: each group's range [min, max] is tried shrunk about its middle by these factors, and each
#: start refined by this many rounds of least squares (see `quantize_int4`).
INT4_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8)
INT4_REFINE_STEPS = 4


def quantize_int4(rows: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """``rows [n, k]`` (float) -> packed uint8 ``[n, k / 2]`` and bf16 scale/zero ``[k / group, n, 2]``.

    Asymmetric groups: a group's range maps onto the 16 codes. The range starts as the group's [min, max],
    shrunk about its middle by each of `INT4_SHRINKS` (clipping the extremes can lower the error of all the
    others); from each start, `INT4_REFINE_STEPS` times, the codes are rounded and the scale and zero refitted
    by least squares to the values given those codes. Each group keeps the candidate with the smallest
    squared error. On the real Gemma-3 270M (the ``quantize="int4"`` mix, 1024 tokens) min/max alone lost
    4.1 % perplexity, least squares from min/max 4.1 %, with the shrink search 2.9 %.
    """
    n, k = rows.shape
    grouped = rows.float().view(n, k // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    middle, half = (low + high) / 2, (high - low) / 2
    best_error = best_scale = best_zero = best_u = None
    for shrink in INT4_SHRINKS:
        scale = (2 * shrink * half / 15).clamp(min=1e-12)
        zero = middle - shrink * half + 8 * scale
        for step in range(INT4_REFINE_STEPS + 1):
            s = scale.to(KERNEL_DTYPE).float().clamp(min=1e-12)  # what is stored, and what the kernels use
            z = zero.to(KERNEL_DTYPE).float()
            u = torch.round((grouped - z[..., None]) / s[..., None]).clamp(-8, 7)  # the code minus 8
            error = (u * s[..., None] + z[..., None] - grouped).square().sum(-1)
            if best_error is None:
                best_error, best_scale, best_zero, best_u = error, s, z, u
            else:
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
                best_u = torch.where(better[..., None], u, best_u)
            if step < INT4_REFINE_STEPS:  # least squares of grouped ~ scale * u + zero for these codes
                su, suu = u.sum(-1), u.square().sum(-1)
                sy, suy = grouped.sum(-1), (u * grouped).sum(-1)
                det = group * suu - su * su
                solvable = det > 0
                det = torch.where(solvable, det, 1.0)
                scale = torch.where(solvable, (group * suy - su * sy) / det, scale)
                zero = torch.where(solvable, (suu * sy - su * suy) / det, zero)
    q = (best_u + 8).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    scale_zero = torch.stack((best_scale.t(), best_zero.t()), dim=-1).to(KERNEL_DTYPE)
    return packed.contiguous(), scale_zero.contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Plain packed uint8 ``[n, k / 2]`` -> the 4-bit values ``[n, k]`` (uint8 0..15)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(packed: Tensor, scale_zero: Tensor, group: int) -> Tensor:
    """Plain packed rows and their ``[k / group, n, 2]`` scale/zero -> float32 ``[n, k]``."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    scale, zero = scale_zero.float().unbind(-1)  # [k / group, n]
    values = (q.view(n, k // group, group) - 8) * scale.t()[..., None] + zero.t()[..., None]
    return values.view(n, k)


@functools.cache
def _cpu_int4_order(rows: int, cols: int) -> Tensor:
    """Where each 4-bit value of a ``[rows, cols]`` block goes in the CPU kernel's tiled layout: for every
    nibble of the tiled uint8 ``[rows, cols / 2]`` block (low before high), the flat index ``r * cols + c``
    of the value it holds. Found by tiling the digits of the indices with the kernel's own conversion, so
    it follows whatever tiling this torch uses; checked to be a permutation."""
    count = rows * cols
    index = torch.arange(count)
    order = torch.zeros(count, dtype=torch.long)
    for digit in range(max(1, math.ceil(math.log(count, 16)))):
        values = ((index >> (4 * digit)) & 15).to(torch.int32).view(rows, cols)
        tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        order |= unpack_int4(tiled).flatten().long() << (4 * digit)
    if not torch.equal(order.sort().values, index):
        raise ConfigError(
            f"this torch's CPU int4 tiling ({torch.__version__}) is not a permutation of the values; "
            "use quantize='int8' or report it"
        )
    return order


def _cpu_int4_blocks(rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, CPU_INT4_TILE):
        yield start, min(start + CPU_INT4_TILE, rows)


def tile_int4_cpu(packed: Tensor) -> Tensor:
    """Plain packed ``[n, k / 2]`` -> the CPU kernel's tiled layout (same shape), 64 rows at a time."""
    out = torch.empty_like(packed)
    for start, stop in _cpu_int4_blocks(packed.shape[0]):
        values = unpack_int4(packed[start:stop]).to(torch.int32)
        out[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)
    return out


def untile_int4_cpu(tiled: Tensor, rows: Tensor | None = None) -> Tensor:
    """The inverse of `tile_int4_cpu`; ``rows`` (ids) restricts it to those rows, in that order."""
    n, half = tiled.shape
    wanted = torch.arange(n) if rows is None else rows.cpu().long()
    blocks = torch.unique(wanted // CPU_INT4_TILE)
    plain_rows: dict[int, Tensor] = {}
    for block in blocks.tolist():
        start, stop = block * CPU_INT4_TILE, min((block + 1) * CPU_INT4_TILE, n)
        values = torch.empty((stop - start) * half * 2, dtype=torch.uint8)
        values[_cpu_int4_order(stop - start, half * 2)] = unpack_int4(tiled[start:stop].cpu()).flatten()
        values = values.view(stop - start, half * 2)
        plain_rows[block] = values[:, 0::2] | (values[:, 1::2] << 4)
    if rows is None:
        return torch.cat([plain_rows[b] for b in blocks.tolist()]).to(tiled.device)
    picked = [plain_rows[int(r) // CPU_INT4_TILE][int(r) % CPU_INT4_TILE] for r in wanted.tolist()]
    return torch.stack(picked).to(tiled.device) if picked else tiled.new_empty(0, half)


def nibble_group(cols: int) -> int | None:
    """The group size of an int8 matrix's nibbles layout (the largest the int4 kernel takes that divides
    ``cols``), or None when there is none."""
    return next((group for group in (256, 128, 64, 32) if cols % group == 0), None)


def int8_to_nibbles(weight: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, int]:
    """int8 ``[n, k]`` and its bf16 row scales -> the CPU int4 kernel's tiled ``[n, k]`` bytes of the
    ``[n, 2k]`` nibble rows ``[h | l]``, their ``[2k / G, n, 2]`` scale/zero, and ``G`` (module docstring).
    The bytes are written over ``weight``'s own storage, a block of rows at a time: no second copy."""
    n, k = weight.shape
    group = nibble_group(k)
    assert group is not None
    tiled = weight.view(torch.uint8)
    for start, stop in _cpu_int4_blocks(n):  # small blocks: large temporaries would stay resident (malloc)
        offset = weight[start:stop].to(torch.int32) + 128  # the whole block is read before it is overwritten
        nibbles = torch.cat((offset >> 4, offset & 15), dim=1)
        tiled[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    s = scale.float()
    scale_zero = torch.zeros(2 * k // group, n, 2)
    scale_zero[: k // group, :, 0] = 16 * s  # a power of two times a bf16 value: still exact in bf16
    scale_zero[k // group :, :, 0] = s
    scale_zero[k // group :, :, 1] = 8 * s
    return tiled, scale_zero.to(KERNEL_DTYPE), group


def nibbles_to_int8(tiled: Tensor, rows: Tensor | None = None) -> Tensor:
    """The inverse of `int8_to_nibbles`' weight: int8 ``[n, k]`` (or only ``rows``)."""
    nibbles = unpack_int4(untile_int4_cpu(tiled, rows)).to(torch.int16)
    k = nibbles.shape[1] // 2
    return (16 * nibbles[:, :k] + nibbles[:, k:] - 128).to(torch.int8)


def _cuda_int4_tiles(cols: int) -> int:
    """``innerKTiles`` for the CUDA int4 kernel: the largest of 8, 4, 2 with ``cols % (16 * tiles) == 0``."""
    for tiles in (8, 4, 2):
        if cols % (16 * tiles) == 0:
            return tiles
    raise ConfigError(f"int4 on CUDA needs in_features divisible by 32; got {cols}. Use quantize='int8'.")


# ------------------------------------------------------------------------------------------------ modules


class QuantizedMatrix(nn.Module):
    """A ``[rows, cols]`` matrix stored in int8 or int4 (layout in the module docstring), with its product
    ``x @ W.T`` (`matmul`) and row lookup (`lookup`).

    ``tiling`` is ``"plain"`` (the documented layout, what ``state_dict`` returns) or, after
    `tile_for_kernels`, the kernel's: ``"tiled-cpu"`` / ``"tiled-cuda"`` for int4, ``"nibbles-cpu"`` for
    int8 on CPU (module docstring; its scale/zero is the non-persistent ``nibble_scale_zero``). Moving the
    module (``.to``) returns it to the plain layout first.
    """

    #: The loader never casts these tensors to the model's dtype (scales stay bf16, see `tinyvlm.weights`).
    keeps_stored_dtype = True

    def __init__(self, rows: int, cols: int, mode: str, group_size: int | None, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_shape(rows, cols, mode, group_size)
        self.rows, self.cols, self.mode, self.group_size = rows, cols, mode, group_size
        self.tiling = "plain"
        if mode == "int8":
            self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(rows, dtype=KERNEL_DTYPE, device=device))
        else:
            assert group_size is not None
            self.register_buffer("weight", torch.empty(rows, cols // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "weight_scale_zero", torch.empty(cols // group_size, rows, 2, dtype=KERNEL_DTYPE, device=device)
            )

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"rows={self.rows}, cols={self.cols}, mode={self.mode}{group}, tiling={self.tiling}"

    # ------------------------------------------------------------------------------------------- filling

    @torch.no_grad()
    def quantize_rows(self, start: int, rows: Tensor) -> None:
        """Quantize float ``rows`` into rows ``start ..`` of this (plain) matrix."""
        stop = start + rows.shape[0]
        rows = rows.to(self.weight.device)
        if self.mode == "int8":
            q, scale = quantize_int8(rows)
            self.weight[start:stop] = q
            self.weight_scale[start:stop] = scale
        else:
            packed, scale_zero = quantize_int4(rows, self.group_size)  # type: ignore[arg-type]
            self.weight[start:stop] = packed
            self.weight_scale_zero[:, start:stop] = scale_zero

    @staticmethod
    def from_float(weight: Tensor, mode: str, group_size: int | None) -> "QuantizedMatrix":
        """Quantize a float ``[rows, cols]`` matrix into a `QuantizedMatrix`, a block of rows at a time (on its
        device)."""
        module = QuantizedMatrix(*weight.shape, mode, group_size, device=weight.device)
        step = block_rows(weight.shape[1])
        for start in range(0, weight.shape[0], step):
            module.quantize_rows(start, weight[start : start + step])
        return module

    # ------------------------------------------------------------------------------------------- reading

    def plain_weight(self) -> Tensor:
        """The stored weight in the plain layout (a new tensor when tiled)."""
        if self.tiling == "tiled-cpu":
            return untile_int4_cpu(self.weight)
        if self.tiling == "nibbles-cpu":
            return nibbles_to_int8(self.weight)
        if self.tiling == "tiled-cuda":
            assert self._plain is not None
            return self._plain.to(self.weight.device)
        return self.weight

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """The float32 matrix the quantized one stands for (or a range of its ``rows``)."""
        weight = self.plain_weight()[rows]
        if self.mode == "int8":
            return weight.float() * self.weight_scale[rows].float()[:, None]
        return dequantize_int4(weight, self.weight_scale_zero[:, rows], self.group_size)  # type: ignore[arg-type]

    def lookup(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` (any shape) of the float32 matrix -> ``[*ids.shape, cols]`` (an embedding lookup)."""
        flat = ids.reshape(-1)
        if self.mode == "int8":
            picked = nibbles_to_int8(self.weight, flat) if self.tiling == "nibbles-cpu" else self.weight[flat]
            rows = picked.float() * self.weight_scale[flat].float()[:, None]
        else:
            if self.tiling == "tiled-cpu":
                packed = untile_int4_cpu(self.weight, flat)
            else:
                packed = self.plain_weight()[flat]
            rows = dequantize_int4(packed, self.weight_scale_zero[:, flat], self.group_size)  # type: ignore[arg-type]
        return rows.view(*ids.shape, self.cols)

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x [..., cols]``, in ``x``'s dtype (through the bf16 kernels). Differentiable in
        ``x`` (the weights are frozen): the gradient is ``dy @ W`` with ``W`` dequantized (`FrozenProduct`), so
        that adapters and earlier parts train through a quantized decoder (QLoRA)."""
        flat = x.reshape(-1, self.cols)
        if torch.is_grad_enabled() and flat.requires_grad:
            out = FrozenProduct.apply(flat, self)
        else:
            out = self._product(flat)
        return out.view(*x.shape[:-1], self.rows)

    def _product(self, flat: Tensor) -> Tensor:
        """``flat [n, cols] @ W.T`` by the kernel of this layout, in ``flat``'s dtype (no autograd). Many rows
        (a prompt, a training batch) in the plain layout are multiplied by blocks of dequantized rows instead:
        the weight-only kernels are built for few rows (`MANY_ROWS`)."""
        if self.tiling == "plain" and (self.mode == "int4" or flat.shape[0] >= MANY_ROWS):
            return self._dequantized_product(flat)
        if self.tiling == "nibbles-cpu":
            x = flat.to(KERNEL_DTYPE)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                torch.cat((x, x), dim=1), self.weight, self.nibble_group, self.nibble_scale_zero
            )
        elif self.mode == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat.to(KERNEL_DTYPE), self.weight, self.weight_scale)
        elif self.tiling == "tiled-cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(KERNEL_DTYPE), self.weight, self.group_size, self.weight_scale_zero
            )
        elif self.tiling == "tiled-cuda":
            out = torch.ops.aten._weight_int4pack_mm(flat.to(KERNEL_DTYPE), self.weight, self.group_size, self.weight_scale_zero)
        return out.to(flat.dtype)

    def _dequantized_product(self, flat: Tensor) -> Tensor:
        """``flat @ W.T`` in fp32 with ``W`` dequantized a block of rows at a time (bounded temporaries)."""
        x = flat.float()
        out = x.new_empty(flat.shape[0], self.rows)
        step = block_rows(self.cols)
        for start in range(0, self.rows, step):
            rows = slice(start, start + step)
            out[:, rows] = F.linear(x, self.dequantize(rows))
        return out.to(flat.dtype)

    # ------------------------------------------------------------------------------------------- tilings

    @torch.no_grad()
    def tile_for_kernels(self, *, few_rows: bool = False) -> None:
        """The kernel's tiling for this device (idempotent): int4 tiled. int8 stays plain, except with
        ``few_rows`` (products of a few rows only: an LM head, one position per sequence) on CPU, where it
        takes the nibbles layout when ``cols`` is a multiple of 32 and ``rows`` of 16: the int4 kernel streams
        it faster at one row, but at many rows it is slower than the int8 kernel, which is slower than
        dequantized blocks (`MANY_ROWS`; ``benchmarks/matmul_kernels.py --rows``)."""
        if self.tiling != "plain" or self.weight.is_meta:
            return
        if self.mode == "int8":
            if few_rows and self.weight.device.type == "cpu" and nibble_group(self.cols) and self.rows % 16 == 0:
                self.weight, scale_zero, self.nibble_group = int8_to_nibbles(self.weight, self.weight_scale)
                self.register_buffer("nibble_scale_zero", scale_zero, persistent=False)
                self.tiling = "nibbles-cpu"
            return
        if self.weight.device.type == "cpu":
            self.weight = tile_int4_cpu(self.weight)
            self.tiling = "tiled-cpu"
        elif self.weight.device.type == "cuda":
            self._plain = self.weight.cpu()  # the CUDA tiling is not inverted here: plain bytes kept (host) for saving
            swapped = (self.weight >> 4) | (self.weight << 4)  # the CUDA conversion wants column 2j in the high nibble
            self.weight = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), _cuda_int4_tiles(self.cols))
            self.tiling = "tiled-cuda"

    @torch.no_grad()
    def to_plain(self) -> None:
        """Back to the plain layout (before a move or a state-dict load)."""
        if self.tiling != "plain":
            self.weight = self.plain_weight().contiguous()
            self._plain = None
            self._buffers.pop("nibble_scale_zero", None)
            self.tiling = "plain"

    _plain: Tensor | None = None
    nibble_group: int | None = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self.to_plain()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiling != "plain":
            destination[prefix + "weight"] = self.plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        self.to_plain()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class FrozenProduct(torch.autograd.Function):
    """``x @ W.T`` of a `QuantizedMatrix` by its kernel (which has no derivative), with the input gradient
    ``dy @ W`` from the dequantized weight; the quantized weights get none (they are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: QuantizedMatrix) -> Tensor:  # type: ignore[override]
        ctx.matrix = matrix
        return matrix._product(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad @ ctx.matrix.dequantize().to(grad.dtype), None


class QuantizedLinear(QuantizedMatrix):
    """A quantized ``nn.Linear`` (``weight [out, in]``), with an optional float bias."""

    def __init__(
        self, in_features: int, out_features: int, mode: str, group_size: int | None, *, bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, mode, group_size, device=device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class QuantizedEmbedding(QuantizedMatrix):
    """A quantized embedding table ``[num_embeddings, embedding_dim]``: ``forward(ids)`` gives float32 rows
    (the decoder casts them to its dtype); a tied LM head multiplies by it with `matmul`."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, mode: str, group_size: int | None, *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, group_size, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        return self.lookup(ids)

    def as_head(self, hidden: Tensor) -> Tensor:
        """The tied LM head's logits, ``hidden @ W.T`` (as `tinyvlm.layers.Embedding.as_head`)."""
        return self.matmul(hidden)

    @torch.no_grad()
    def grow_to(self, rows: int) -> None:
        """Append rows up to ``rows`` in all, each the mean of the existing (dequantized) rows, quantized (as
        `tinyvlm.layers.Embedding.grow_to`); back to the plain tiling first."""
        self.to_plain()
        old = self.rows
        mean = self.dequantize().mean(0, keepdim=True)
        grown = QuantizedEmbedding(rows, self.cols, self.mode, self.group_size, device=self.weight.device)
        grown.weight[:old] = self.weight
        if self.mode == "int8":
            grown.weight_scale[:old] = self.weight_scale
        else:
            grown.weight_scale_zero[:, :old] = self.weight_scale_zero
        grown.quantize_rows(old, mean.expand(rows - old, -1))
        for name in ("weight", "weight_scale", "weight_scale_zero"):
            if name in self._buffers:
                self._buffers[name] = grown._buffers[name]
        self.rows = self.num_embeddings = grown.rows


def stack_rows(parts: "list[QuantizedLinear]") -> "QuantizedLinear | None":
    """One matrix whose rows are the parts' rows in order (its product is their outputs side by side), in
    their prepared layout, sharing their storage: each part's weight becomes a view of its rows (scales are
    small and copied). None when they cannot be stacked: different modes, layouts, devices, widths or
    groups, a bias, the CUDA int4 layout, or, in the tiled CPU layouts, a part before the last whose rows are
    not whole 64-row tiles (the kernel would read across its edge)."""
    first = parts[0]
    same = {(p.mode, p.tiling, p.cols, p.group_size, p.nibble_group, p.weight.device) for p in parts}
    if (
        len(parts) < 2 or len(same) > 1 or first.tiling == "tiled-cuda" or first.weight.is_meta
        or any(p.bias is not None for p in parts)
        or (first.tiling != "plain" and any(p.rows % CPU_INT4_TILE for p in parts[:-1]))
    ):  # fmt: skip
        return None
    stacked = QuantizedLinear(first.cols, sum(p.rows for p in parts), first.mode, first.group_size, device="meta")
    stacked.tiling, stacked.nibble_group = first.tiling, first.nibble_group
    for name, dim in (("weight", 0), ("weight_scale", 0), ("weight_scale_zero", 1), ("nibble_scale_zero", 1)):
        if name in first._buffers:
            stacked.register_buffer(name, torch.cat([p._buffers[name] for p in parts], dim), persistent=name != "nibble_scale_zero")
    start = 0
    for part in parts:
        part.weight = stacked.weight[start : start + part.rows]
        start += part.rows
    return stacked


def block_rows(cols: int) -> int:
    """Rows per block of `BLOCK_VALUES` values (at least 16)."""
    return max(16, BLOCK_VALUES // cols)


def check_shape(rows: int, cols: int, mode: str, group_size: int | None) -> None:
    """Refuse shapes the kernels cannot take, naming the fix."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"unknown quantize mode {mode!r}; use one of {', '.join(QUANT_MODES)}")
    if mode == "int4":
        if group_size is None or cols % group_size or rows % 16:
            raise ConfigError(
                f"int4 needs a matrix whose input width is a multiple of the group size {group_size} and whose "
                f"row count is a multiple of 16; this one is [{rows}, {cols}]. Use quantize='int8' for this model."
            )


# ------------------------------------------------------------------------------------ applying to decoders


def quantized_targets(decoder: nn.Module, config: QuantizationConfig) -> dict[str, str]:
    """Module names (relative to ``decoder``) to quantize, with the mode of each: every ``nn.Linear`` of
    the blocks (`QuantizationConfig.mode_of`); ``embed_tokens`` and an untied ``lm_head`` in
    ``config.embedding``."""
    targets = {}
    for name, module in decoder.named_modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)) and name.startswith("layers."):
            targets[name] = config.mode_of(name)
        elif name in ("embed_tokens", "lm_head"):
            targets[name] = config.embedding
    if "embed_tokens" not in targets:
        raise ConfigError(f"{type(decoder).__name__} is not a decoder with embed_tokens and layers; it cannot be quantized")
    return targets


def _replacement(module: nn.Module, mode: str, group_size: int | None, device: torch.device | str | None) -> QuantizedMatrix:
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, mode, group_size, device=device)
    assert isinstance(module, nn.Linear)
    return QuantizedLinear(module.in_features, module.out_features, mode, group_size, bias=module.bias is not None, device=device)


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def quantized_structure(decoder: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Replace the target modules of a (meta-built) decoder by empty quantized ones of the same names, so
    that a saved quantized checkpoint loads into it strictly."""
    for name, mode in quantized_targets(decoder, config).items():
        module = decoder.get_submodule(name)
        if not isinstance(module, QuantizedMatrix):
            _swap(decoder, name, _replacement(module, mode, config.group_size, device="meta"))
    return decoder


@torch.no_grad()
def quantize_decoder(decoder: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Quantize a loaded decoder in place, one matrix at a time (each float matrix is freed as soon as its
    quantized replacement is in place, unless something else holds it). For models already in memory;
    loading with ``quantize=`` streams from the checkpoint instead."""
    for name, mode in quantized_targets(decoder, config).items():
        module = decoder.get_submodule(name)
        if isinstance(module, QuantizedMatrix):
            continue
        weight = module.weight.detach()
        if not weight.is_floating_point():
            raise ConfigError(f"{name}.weight is {weight.dtype}, not floating point; it cannot be quantized")
        new = _replacement(module, mode, config.group_size, device=weight.device)
        step = block_rows(weight.shape[1])
        for start in range(0, weight.shape[0], step):
            new.quantize_rows(start, weight[start : start + step])
        if isinstance(new, QuantizedLinear) and new.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        _swap(decoder, name, new)
        del weight, module
    return decoder


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize a loaded decoder or VLM in place (a VLM's decoder; encoder and projector stay as they are) and
    record it in a VLM's config. ``mode``: ``"int8"`` or ``"int4"``. The kernels' tilings come with
    `tinyvlm.inference.prepare_for_inference`, which the doors (``quantize=``) take."""
    config = QuantizationConfig.for_mode(mode)
    decoder = getattr(model, "decoder", model)
    weight = decoder.embed_tokens.weight
    check_target(config, dtype=getattr(decoder, "dtype", None), device=weight.device)
    current = getattr(getattr(model, "config", None), "quantization", None)
    if current is not None and current != config:
        raise ConfigError(
            f"this model is already quantized ({current.mode}); load the unquantized checkpoint to quantize it "
            f"as {mode}"
        )
    quantize_decoder(decoder, config)
    if hasattr(model, "decoder") and hasattr(model.config, "quantization"):
        model.config = model.config.replace(quantization=config)
    return model


# ------------------------------------------------------------------------------------ quantizing at load


class LoadQuantizer:
    """Quantizes a meta-built model's decoder matrices while `tinyvlm.weights.load_checkpoint` reads them
    (its ``filler``). ``prefix``: where the decoder sits in the loaded module (``"decoder."`` in a VLM).

    The loader still checks the checkpoint against the float structure (names, shapes); for each claimed
    tensor it calls `fill`, which reads the rows a block at a time, quantizes them into a new module and
    puts that in place of the float one. Shapes the kernels cannot take are refused before anything is read.
    """

    def __init__(self, root: nn.Module, config: QuantizationConfig, prefix: str = "") -> None:
        self.root, self.config = root, config
        decoder = root.get_submodule(prefix.rstrip(".")) if prefix else root
        self.modes = {f"{prefix}{name}.weight": mode for name, mode in quantized_targets(decoder, config).items()}
        for target, mode in self.modes.items():
            rows, cols = root.get_parameter(target).shape
            check_shape(rows, cols, mode, config.group_size)

    def claims(self, target: str) -> bool:
        return target in self.modes

    @torch.no_grad()
    def fill(self, target: str, rows: FileRows, device: torch.device) -> None:
        name = target.removesuffix(".weight")
        old = self.root.get_submodule(name)
        new = _replacement(old, self.modes[target], self.config.group_size, device)
        if isinstance(new, QuantizedLinear) and new.bias is not None:
            new.bias = old.bias  # still meta, or loaded already: the loader fills it by name either way
        for start, block in rows.blocks(block_rows(rows.cols)):
            new.quantize_rows(start, block)
        _swap(self.root, name, new)
