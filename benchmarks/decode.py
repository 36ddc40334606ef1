"""Greedy decoding speed side by side in one run: tinyvlm fp32 / int8 / int4, transformers fp32 and, when
llama-cpp-python is installed (``pip install "tinyvlm[bench]"``), llama.cpp F32 / Q8_0 / Q4_K_M, on the same
weights (bench_models.py builds and caches them).

    python benchmarks/decode.py [--models gemma-3-270m smollm2-135m] [--new-tokens 64] [--rounds 5]
                                [--threads 2] [--busy] [--engines ...]

gemma-3-270m: the real weights; smollm2-135m: SmolLM2-135M shapes with random weights. Batch 1, ``--new-tokens``
new tokens after a 16-token prompt of random ids, timed per token from the second new token on (the prefill
is excluded). Every engine runs once per round, rounds interleaved, so that all see the same load on a shared
machine; best / median / worst tokens/s are printed, with the ratio of each to transformers and to llama.cpp.
The torch engines also report the 512-token prefill time.

Threads: torch's intra-op count is set to ``--threads`` (transformers uses it as is; tinyvlm, left on its
default, chooses per step between that count and one, see tinyvlm.inference.threads); llama.cpp gets ``n_threads``.
``--busy`` runs everything twice: on the machine as it is, then with one extra process spinning on a core
(``python -c "while True: pass"``) started by this script, and prints both conditions.

llama.cpp is loaded with ``use_extra_bufts = False`` (llama.cpp's ``--no-repack``): on the AMX-capable
Xeon this was measured on, its AMX repacking path dies with SIGILL (an AMX ``tilezero`` in a worker thread).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

import tinyvlm  # noqa: E402
from bench_models import GGUF_TYPES, gguf_file, gguf_types, hf_folder  # noqa: E402

TORCH_ENGINES = ("tinyvlm fp32", "tinyvlm int8", "tinyvlm int4", "transformers fp32")
LLAMA_ENGINES = tuple(f"llama.cpp {kind}" for kind in GGUF_TYPES)
PROMPT_TOKENS, PREFILL_TOKENS = 16, 512


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first new token (whose time includes the prefill)."""
    return (len(times) - 1) / (times[-1] - times[0])


class _Clock:
    """A transformers streamer that only records when each token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Engine:
    """One way of decoding: ``decode()`` -> tokens/s of one greedy run; ``prefill()`` -> seconds or None."""

    name: str
    megabytes: float

    def decode(self) -> float:
        raise NotImplementedError

    def prefill(self) -> float | None:
        return None


def tensor_megabytes(module: torch.nn.Module) -> float:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # shared (tied) tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


class TinyVLM(Engine):
    def __init__(self, folder: Path, mode: str, prompt: torch.Tensor, long_prompt: torch.Tensor, new: int) -> None:
        self.name = f"tinyvlm {mode}"
        self.model = tinyvlm.build_decoder(
            f"local-dir:{folder}", dtype=torch.float32, quantize=None if mode == "fp32" else mode
        )
        self.megabytes = tensor_megabytes(self.model)
        self.prompt, self.long_prompt, self.new = prompt, long_prompt, new

    def tokens(self) -> torch.Tensor:
        return self.model.generate(self.prompt, max_new_tokens=self.new, eos_token_id=[])

    def decode(self) -> float:
        return decode_rate(
            [time.perf_counter() for _ in self.model.generate_stream(self.prompt, max_new_tokens=self.new, eos_token_id=[])]
        )

    def prefill(self) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.logits(self.model.hidden_states(self.long_prompt, cache=self.model.new_cache(1, PREFILL_TOKENS))[:, -1])
        return time.perf_counter() - start


class Transformers(Engine):
    def __init__(self, folder: Path, prompt: torch.Tensor, long_prompt: torch.Tensor, new: int) -> None:
        import transformers

        self.name = "transformers fp32"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.megabytes = tensor_megabytes(self.model)
        self.prompt, self.long_prompt, self.new = prompt, long_prompt, new

    def tokens(self, streamer: _Clock | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(
                self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=self.new,
                min_new_tokens=self.new, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer,
            )

    def decode(self) -> float:
        clock = _Clock()
        self.tokens(clock)
        return decode_rate(clock.times[1:])

    def prefill(self) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            self.model(self.long_prompt, logits_to_keep=1, use_cache=True)
        return time.perf_counter() - start


_QUIET = None  # llama.cpp's log callback (a ctypes function)


class LlamaCpp(Engine):
    """llama.cpp through llama-cpp-python's C API: one context, greedy sampler, token ids in and out."""

    def __init__(self, path: Path, kind: str, prompt: list[int], new: int, threads: int) -> None:
        import llama_cpp as L

        self.L, self.name, self.prompt, self.new = L, f"llama.cpp {kind}", prompt, new
        self.megabytes = path.stat().st_size / 1e6
        self.types = gguf_types(path)
        global _QUIET
        L.llama_backend_init()
        if _QUIET is None:  # kept alive for as long as llama.cpp may call it
            _QUIET = L.llama_log_callback(lambda level, text, data: None)
            L.llama_log_set(_QUIET, None)
        model_params = L.llama_model_default_params()
        model_params.use_extra_bufts = False  # see the module docstring
        self.model = L.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        context_params = L.llama_context_default_params()
        context_params.n_ctx = len(prompt) + new + 8
        context_params.n_batch = context_params.n_ubatch = 512
        context_params.n_threads = context_params.n_threads_batch = threads
        self.context = L.llama_init_from_model(self.model, context_params)
        self.sampler = L.llama_sampler_init_greedy()

    def generate(self) -> tuple[list[int], list[float]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.context), True)
        prompt = (L.llama_token * len(self.prompt))(*self.prompt)
        if L.llama_decode(self.context, L.llama_batch_get_one(prompt, len(self.prompt))) != 0:
            raise SystemExit("llama_decode failed")
        token = L.llama_sampler_sample(self.sampler, self.context, -1)
        tokens, times = [token], [time.perf_counter()]
        one = (L.llama_token * 1)()
        for _ in range(self.new - 1):
            one[0] = token
            if L.llama_decode(self.context, L.llama_batch_get_one(one, 1)) != 0:
                raise SystemExit("llama_decode failed")
            token = L.llama_sampler_sample(self.sampler, self.context, -1)
            tokens.append(token)
            times.append(time.perf_counter())
        return tokens, times

    def decode(self) -> float:
        return decode_rate(self.generate()[1])


def spread(values: list[float]) -> str:
    return f"{max(values):6.1f} {statistics.median(values):6.1f} {min(values):6.1f}"


def run_rounds(engines: list[Engine], rounds: int) -> dict[str, dict[str, list[float]]]:
    results = {e.name: {"decode": [], "prefill": []} for e in engines}
    for _ in range(rounds):
        for engine in engines:
            results[engine.name]["decode"].append(engine.decode())
            seconds = engine.prefill()
            if seconds is not None:
                results[engine.name]["prefill"].append(seconds)
    return results


def report(title: str, engines: list[Engine], results: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    print(f"\n{title}")
    print(f"  {'engine':18} {'MB':>6}  {'decode tok/s best median worst':>30}  {'GB/s':>5}  {'x transformers':>14}  "
          f"{'prefill 512 ms':>14}")
    best = {name: max(r["decode"]) for name, r in results.items()}
    reference = best.get("transformers fp32")
    for engine in engines:
        r = results[engine.name]
        ratio = f"x{best[engine.name] / reference:.2f}" if reference else "-"
        prefill = f"{min(r['prefill']) * 1000:.0f}" if r["prefill"] else "-"
        print(f"  {engine.name:18} {engine.megabytes:6.0f}  {spread(r['decode']):>30}  "
              f"{best[engine.name] * engine.megabytes / 1000:5.1f}  {ratio:>14}  {prefill:>14}")
    pairs = [("tinyvlm fp32", "llama.cpp F32"), ("tinyvlm int8", "llama.cpp Q8_0"), ("tinyvlm int4", "llama.cpp Q4_K_M")]
    shown = [f"{ours.split()[1]} / {theirs.split()[1]} x{best[ours] / best[theirs]:.2f}" for ours, theirs in pairs
             if ours in best and theirs in best]  # fmt: skip
    if shown:
        print("  tinyvlm vs llama.cpp (best vs best): " + ", ".join(shown))
    return best


def bench(name: str, args: argparse.Namespace) -> None:
    folder = hf_folder(name)
    vocab = tinyvlm.get_spec("smollm2-135m").config.vocab_size if name == "smollm2-135m" else 262144
    prompt = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    long_prompt = torch.randint(3, vocab, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(1))
    engines: list[Engine] = []
    for engine in args.engines:
        if engine.startswith("tinyvlm"):
            engines.append(TinyVLM(folder, engine.split()[1], prompt, long_prompt, args.new_tokens))
        elif engine == "transformers fp32":
            engines.append(Transformers(folder, prompt, long_prompt, args.new_tokens))
        else:
            engines.append(LlamaCpp(gguf_file(name, engine.split()[1]), engine.split()[1], prompt[0].tolist(),
                                    args.new_tokens, args.threads))
    by_name = {e.name: e for e in engines}
    if "tinyvlm fp32" in by_name and "transformers fp32" in by_name:
        same = torch.equal(by_name["tinyvlm fp32"].tokens(), by_name["transformers fp32"].tokens())
        print(f"\n{name}: tinyvlm fp32 and transformers greedy tokens {'identical' if same else 'DIFFER'}")
    for engine in engines:
        if isinstance(engine, LlamaCpp):
            print(f"  {engine.name}: {engine.types}")

    conditions = ["as is", "one core busy"] if args.busy else ["as is"]
    best: dict[str, dict[str, float]] = {}
    for condition in conditions:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "one core busy" else None
        try:
            time.sleep(0.5 if spinner else 0)
            load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
            title = (f"{name}, {condition} (load {load}), {args.threads} threads, {args.new_tokens} new tokens, "
                     f"{args.rounds} interleaved rounds")
            best[condition] = report(title, engines, run_rounds(engines, args.rounds))
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    if args.busy:
        idle, busy = best["as is"], best["one core busy"]
        print("  one core busy / as is: " + ", ".join(f"{e.name} {busy[e.name] / idle[e.name]:.0%}" for e in engines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also measure with one core kept busy by another process")
    try:
        import llama_cpp  # noqa: F401

        default = [*TORCH_ENGINES, *LLAMA_ENGINES]
    except ImportError:
        print("llama-cpp-python is not installed (pip install 'tinyvlm[bench]'): no llama.cpp columns")
        default = list(TORCH_ENGINES)
    parser.add_argument("--engines", nargs="+", default=default, choices=[*TORCH_ENGINES, *LLAMA_ENGINES],
                        metavar="ENGINE", help=f"any of: {', '.join(repr(e) for e in (*TORCH_ENGINES, *LLAMA_ENGINES))}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
