"""Streaming overhead: time `VLM.stream` spends outside the model's forward (detokenization and bookkeeping)
while it streams a long answer, and the total.

    python benchmarks/stream.py [--new-tokens 512] [--rounds 5] [--against OTHER/src]

    git worktree add /tmp/old b3155d9 && python benchmarks/stream.py --against /tmp/old/src   # before / after

A tiny random-init VLM (test-siglip + test-llama, fp32, CPU, one thread) answers one prompt about one image
with ``--new-tokens`` tokens (end-of-sequence ignored), sampled at temperature 1 from a fixed global seed, so
the text is varied and the same on every checkout that formats the prompt alike (the printed digest tells).
The model's forward is timed (``VLM.embed_inputs``: image encoder, projector, embeddings; the decoder's
``hidden_states`` and ``logits``); the rest of the time from the call to the last piece is overhead
(prompt encoding, sampling, detokenization, bookkeeping), of which ``tokenizer.decode`` is shown apart.
Re-decoding the whole answer at every step makes that overhead grow as n^2; decoding a window of recent
tokens keeps it linear. Each round is a fresh process
(one warm-up stream, then the timed one); with ``--against``, rounds of this checkout and of the other one
alternate, so that both see the same machine load, and the ratio of the medians is printed. Only the
public API is used, so the same code runs on older checkouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import tinyvlm


class Timer:
    """Wraps methods of objects (instance attributes shadow the methods) and sums their time."""

    def __init__(self, *methods: tuple[object, str]) -> None:
        self.seconds = 0.0
        for owner, name in methods:
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return timed


def one_round(vlm, image: Image.Image, model: Timer, decode: Timer, new_tokens: int) -> dict[str, object]:
    """Seconds in all, in the model's forward and in ``tokenizer.decode`` of one streamed answer."""
    torch.manual_seed(0)
    model.seconds = decode.seconds = 0.0
    began = time.perf_counter()
    pieces = list(vlm.stream("<image>Describe the image.", [image], max_new_tokens=new_tokens, temperature=1.0))
    total = time.perf_counter() - began
    return {"total": total, "outside": total - model.seconds, "decode": decode.seconds, "pieces": len(pieces),
            "answer": "".join(pieces)}  # fmt: skip


def measure(new_tokens: int) -> dict[str, object]:
    """One warm-up and one timed round with the tinyvlm this process imports."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    context = {"max_position_embeddings": new_tokens + 512}  # room for the prompt; 2048 would cap --new-tokens
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", pretrained=False, decoder_kwargs=context).eval()
    if hasattr(vlm, "prepare_for_inference"):  # older checkouts: a method, not taken by every door
        vlm.prepare_for_inference()
    vlm.decoder.config = vlm.decoder.config.replace(eos_token_ids=[])  # always --new-tokens tokens
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).rectangle((56, 56, 168, 168), fill="red")
    model = Timer((vlm, "embed_inputs"), (vlm.decoder, "hidden_states"), (vlm.decoder, "logits"))
    decode = Timer((vlm.tokenizer, "decode"))
    one_round(vlm, image, model, decode, new_tokens)  # warm-up
    result = one_round(vlm, image, model, decode, new_tokens)
    answer = str(result.pop("answer"))
    return {**result, "characters": len(answer), "sha1": hashlib.sha1(answer.encode()).hexdigest()[:12],
            "tinyvlm": tinyvlm.__file__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", metavar="SRC", help="another checkout's src/ folder, run in alternation")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)  # a child: one JSON line
    args = parser.parse_args()
    if args.one_round:
        print(json.dumps(measure(args.new_tokens)))
        return
    checkouts = {"this checkout": str(Path(__file__).resolve().parents[1] / "src")}
    if args.against:
        checkouts["--against"] = str(Path(args.against).resolve())
    rounds: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):  # alternated, so that both see the same machine load
        for name, src in checkouts.items():
            command = [sys.executable, __file__, "--one-round", "--new-tokens", str(args.new_tokens)]
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"the round with {src} failed:\n{done.stderr[-2000:]}")
            rounds[name].append(json.loads(done.stdout.splitlines()[-1]))
    medians: dict[str, dict[str, float]] = {}
    for name, results in rounds.items():
        first = results[0]
        assert all(r["sha1"] == first["sha1"] for r in results), "the answer changed between rounds"
        print(f"{name}: {first['tinyvlm']}")
        print(f"  {args.new_tokens} new tokens, {first['pieces']} pieces, {first['characters']} characters, "
              f"answer sha1 {first['sha1']}, {args.rounds} rounds")
        medians[name] = {}
        for key, label in (("total", "total"), ("outside", "outside the model"), ("decode", "  in tokenizer.decode")):
            values = [float(r[key]) for r in results]
            medians[name][key] = median = statistics.median(values)
            print(f"  {label:22} best {min(values) * 1e3:8.1f} ms   median {median * 1e3:8.1f} ms   "
                  f"({median / args.new_tokens * 1e6:6.0f} us per token)")
    if args.against:
        ours, other = medians["this checkout"], medians["--against"]
        print("--against / this checkout (medians): " + ", ".join(
            f"{key} {other[key] / ours[key]:.2f}x" for key in ("total", "outside", "decode")))


if __name__ == "__main__":
    main()
