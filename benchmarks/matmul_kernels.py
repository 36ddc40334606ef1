"""The products of one decoding step, kernel by kernel: how fast each of PyTorch's CPU kernels streams a
decoder's weights at batch 1, and what that leaves for everything else.

    python benchmarks/matmul_kernels.py [--model gemma-3-270m|smollm2-135m] [--threads 2] [--rounds 5] [--rows 1 8 ...]

For the model's shapes (every linear layer of every block, each its own matrix so that they are read from
memory as in decoding, not from cache; and the LM head), one bf16 / fp32 input row is multiplied by:

* ``fp32``: fp32 weights in tinyvlm's decoding layout, multiplied as tinyvlm does (``inference.products.split_linear``:
  one row's product spread over the threads);
* ``int8 kernel``: ``aten._weight_int8pack_mm`` (per-row scales, bf16 input);
* ``int8 nibbles``: the same int8 values through ``aten._weight_int4pack_mm_for_cpu`` as ``16 h + l``
  (tinyvlm's prepared CPU int8 layout, see tinyvlm/inference/quantize.py);
* ``int4``: ``aten._weight_int4pack_mm_for_cpu``, group 128;
* ``int8 inductor``: what ``torch.compile`` (Inductor, default mode) generates for the product written out,
  ``(x * W.float()).sum(-1) * s`` (the form that compiled fastest of those tried; a ``max-autotune`` CPP
  GEMM template was slower still); compiled once per shape, in the first round;
* ``w8a8 fbgemm``: not weight-only, not used by tinyvlm: ``quantized::linear_dynamic`` (what the deprecated
  ``torch.ao.quantization.quantize_dynamic`` runs on x86), which quantizes the fp32 input row to 7-bit
  integers with one scale for the row and multiplies with integer dot products. It is PyTorch's only CPU
  kernel that reads int8 near memory speed at one row; its activation rounding costs too much perplexity
  (``python benchmarks/quality.py --modes fp32 int8 w8a8``);
* ``int8 dequantized`` (with ``--rows``): the same int8 matrix dequantized a block of rows at a time and
  multiplied in fp32 (what tinyvlm does from `MANY_ROWS` rows on, ``QuantizedMatrix._dequantized_product``).

``--rows N ...`` times the blocks' products at each number of input rows instead (a prompt of N tokens).

Rounds are interleaved (all weights are made first, about 1.8 GB for Gemma); the best round of each is printed as milliseconds per decoding step (blocks, head,
both) and GB/s of weight bytes. Random weights: the kernels' speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import torch

from tinyvlm.inference.products import split_linear
from tinyvlm.inference.quantize import QuantizedMatrix, int8_to_nibbles

SHAPES = {  # (hidden, q width, kv width, intermediate, layers, vocab)
    "gemma-3-270m": (640, 1024, 256, 2048, 18, 262144),
    "smollm2-135m": (576, 576, 192, 1536, 30, 49152),
}


def block_shapes(model: str) -> list[tuple[int, int]]:
    hidden, q, kv, inter, layers, _ = SHAPES[model]
    one = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    return one * layers


def int4_group(cols: int) -> int:
    return next(g for g in (128, 64, 32) if cols % g == 0)


def fbgemm_packed(weight: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 ``weight`` with per-row ``scale`` (quantized tensors are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = weight.shape[0]
        quantized = torch._make_per_channel_quantized_tensor(weight, scale.double(), torch.zeros(rows, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(quantized, None)


def int8_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x * weight.float()).sum(-1) * scale


@functools.cache
def inductor_int8_product():  # compiled when first asked for: importing this file must not load Inductor
    return torch.compile(int8_product)


class Kernel:
    """One way of multiplying: ``prepare(weight)`` -> state, ``run(x, state)``; ``nbytes(state)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, weight: torch.Tensor):
        rows, cols = weight.shape
        if self.name == "fp32":
            return weight.t().contiguous().t() if rows >= cols else weight.contiguous()
        q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
        scale = (torch.rand(rows) * 1e-2).to(torch.bfloat16)
        if self.name == "int8 kernel":
            return q, scale
        if self.name == "int8 dequantized":
            matrix = QuantizedMatrix(rows, cols, "int8", None)
            matrix.weight.copy_(q)
            matrix.weight_scale.copy_(scale)
            return matrix
        if self.name == "int8 nibbles":
            return int8_to_nibbles(q, scale)
        if self.name == "w8a8 fbgemm":
            return fbgemm_packed(q, scale), q, scale
        if self.name == "int8 inductor":
            return q, scale.float()
        group = int4_group(cols)
        tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (rows, cols), dtype=torch.int32), 1)
        return tiled, torch.rand(cols // group, rows, 2).to(torch.bfloat16), group

    def run(self, x: torch.Tensor, state) -> torch.Tensor:
        if self.name == "fp32":
            return split_linear(x.float(), state)
        if self.name == "int8 dequantized":
            return state._dequantized_product(x.float())
        if self.name == "w8a8 fbgemm":
            return torch.ops.quantized.linear_dynamic(x.float(), state[0], True)
        if self.name == "int8 inductor":
            return inductor_int8_product()(x.float(), *state)
        x = x.to(torch.bfloat16)
        if self.name == "int8 kernel":
            return torch.ops.aten._weight_int8pack_mm(x, *state)
        if self.name == "int8 nibbles":
            tiled, scale_zero, group = state
            return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat((x, x), 1), tiled, group, scale_zero)
        tiled, scale_zero, group = state
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiled, group, scale_zero)

    @staticmethod
    def nbytes(state) -> int:
        if isinstance(state, QuantizedMatrix):
            return sum(t.numel() * t.element_size() for t in state.buffers())
        tensors = state if isinstance(state, tuple) else (state,)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="gemma-3-270m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", help="time the blocks' products at these numbers of rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rows:
        return by_rows(args)
    hidden, *_, vocab = SHAPES[args.model]
    kernels = [Kernel(name) for name in ("fp32", "int8 kernel", "int8 nibbles", "int4", "int8 inductor", "w8a8 fbgemm")]
    parts = {"blocks": block_shapes(args.model), "head": [(vocab, hidden)]}
    states = {(k.name, part): [k.prepare(torch.randn(r, c) * 0.02) for r, c in shapes] for k in kernels for part, shapes in parts.items()}
    inputs = {cols: torch.randn(1, cols) for shapes in parts.values() for _, cols in shapes}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):  # every kernel once per round
        for (name, part), prepared in states.items():
            kernel = next(k for k in kernels if k.name == name)
            start = time.perf_counter()
            for (_, cols), state in zip(parts[part], prepared):
                kernel.run(inputs[cols], state)
            elapsed = time.perf_counter() - start
            best[name, part] = min(best.get((name, part), elapsed), elapsed)
    sizes = {key: sum(Kernel.nbytes(state) for state in prepared) for key, prepared in states.items()}
    print(f"{args.model}: one decoding step's products, {args.threads} threads, best of {args.rounds} rounds, torch {torch.__version__}")
    print(f"{'kernel':14s} {'blocks ms':>10s} {'head ms':>8s} {'total ms':>9s} {'MB':>7s} {'GB/s':>6s}")
    for kernel in kernels:
        blocks, head = best[kernel.name, "blocks"], best[kernel.name, "head"]
        megabytes = (sizes[kernel.name, "blocks"] + sizes[kernel.name, "head"]) / 1e6
        print(f"{kernel.name:14s} {blocks * 1e3:10.2f} {head * 1e3:8.2f} {(blocks + head) * 1e3:9.2f} "
              f"{megabytes:7.0f} {megabytes / 1e3 / (blocks + head):6.1f}")  # fmt: skip


def by_rows(args: argparse.Namespace) -> None:
    kernels = [Kernel(name) for name in ("fp32", "int8 kernel", "int8 dequantized", "int8 nibbles", "int4")]
    shapes = block_shapes(args.model)
    states = {k.name: [k.prepare(torch.randn(r, c) * 0.02) for r, c in shapes] for k in kernels}
    print(f"{args.model}: the blocks' products (all layers) at each number of rows, ms, {args.threads} threads, "
          f"best of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'rows':>5s} " + " ".join(f"{k.name:>16s}" for k in kernels))
    for rows in args.rows:
        inputs = {cols: torch.randn(rows, cols) for _, cols in shapes}
        best = {k.name: float("inf") for k in kernels}
        for _ in range(args.rounds):
            for kernel in kernels:
                start = time.perf_counter()
                for (_, cols), state in zip(shapes, states[kernel.name]):
                    kernel.run(inputs[cols], state)
                best[kernel.name] = min(best[kernel.name], time.perf_counter() - start)
        print(f"{rows:5d} " + " ".join(f"{best[k.name] * 1e3:16.2f}" for k in kernels))


if __name__ == "__main__":
    main()
