"""Streaming overhead: time `VLM.stream` spends outside the model's forward (detokenization and bookkeeping)
while it streams a long answer, and the total.

    python benchmarks/stream.py [--new-tokens 512] [--rounds 5]
    PYTHONPATH=/tmp/old/src python benchmarks/stream.py      # the same on another checkout (e.g. b3155d9)

A tiny random-init VLM (test-siglip + test-llama, fp32, CPU, one thread) answers one prompt about one image
with ``--new-tokens`` tokens (end-of-sequence ignored), sampled at temperature 1 from a fixed global seed, so
the text is varied and the same on every checkout that formats the prompt alike (the printed digest tells).
The model's forward is timed (``VLM.embed_inputs``: image encoder, projector, embeddings; the decoder's
``hidden_states`` and ``logits``); the rest of the time from the call to the last piece is overhead
(prompt encoding, sampling, detokenization, bookkeeping), of which ``tokenizer.decode`` is shown apart. Re-decoding the whole answer at every step makes that
overhead grow as n^2; decoding a window of recent tokens keeps it linear. Only the public API is used, so
the script runs unchanged on older checkouts. Best and median of ``--rounds`` rounds after one warm-up.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    context = {"max_position_embeddings": args.new_tokens + 64}  # test-llama's 2048 would cap --new-tokens
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", pretrained=False, decoder_kwargs=context).eval()
    if hasattr(vlm, "prepare_for_inference"):  # older checkouts took this step inside generate
        vlm.prepare_for_inference()
    vlm.decoder.config = vlm.decoder.config.replace(eos_token_ids=[])  # always --new-tokens tokens
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).rectangle((56, 56, 168, 168), fill="red")
    model = Timer((vlm, "embed_inputs"), (vlm.decoder, "hidden_states"), (vlm.decoder, "logits"))
    decode = Timer((vlm.tokenizer, "decode"))
    one_round(vlm, image, model, decode, args.new_tokens)  # warm-up
    rounds = [one_round(vlm, image, model, decode, args.new_tokens) for _ in range(args.rounds)]
    answer = rounds[0]["answer"]
    assert all(r["answer"] == answer for r in rounds), "the answer changed between rounds"
    print(f"tinyvlm {tinyvlm.__file__}, {args.rounds} rounds")
    print(f"{args.new_tokens} new tokens, {rounds[0]['pieces']} pieces, {len(answer)} characters, "
          f"answer sha1 {hashlib.sha1(answer.encode()).hexdigest()[:12]}")
    for key, label in (("total", "total"), ("outside", "outside the model"), ("decode", "  in tokenizer.decode")):
        values = [float(r[key]) for r in rounds]  # type: ignore[arg-type]
        median = statistics.median(values)
        print(f"{label:22} best {min(values) * 1e3:8.1f} ms   median {median * 1e3:8.1f} ms   "
              f"({median / args.new_tokens * 1e6:6.0f} us per token)")


if __name__ == "__main__":
    main()
