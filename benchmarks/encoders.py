"""Encoder throughput: tinyvlm against the transformers reference, same weights, one run.

Each family is built at a real zoo size with random weights in transformers (its default attention, SDPA),
saved in the official layout, and loaded into tinyvlm through ``local-dir:``; both then encode the same batch
of 8 images on the CPU with 2 threads, in eval mode under ``torch.inference_mode``. Runs alternate between
the two models (each going first in turn) and the best of ``--repeats`` timings is kept for each, so that a noisy neighbour on a shared
machine does not favour either side. Prints images/s and the ratio tinyvlm / reference (> 1: faster).

    python benchmarks/encoders.py [--repeats 5] [--so400m]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

import tinyvlm

BATCH = 8


def _reference(key: str) -> tuple[torch.nn.Module, int]:
    """The transformers model with the architecture of zoo entry ``key``, and its input size."""
    spec = tinyvlm.get_spec(key)
    fields = spec.config.model_dump()
    if spec.family == "siglip":
        fields.pop("resample")
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**fields))
    else:
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**fields))
    return model.eval(), spec.config.image_size


def _seconds(run, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    run(pixels)
    return time.perf_counter() - start


def bench(key: str, repeats: int) -> tuple[float, float, float]:
    reference, size = _reference(key)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = tinyvlm.build_encoder(f"local-dir:{Path(folder)}")
    pixels = torch.randn(BATCH, 3, size, size)
    prefix = ours.num_prefix_tokens

    def run_ref(x: torch.Tensor) -> torch.Tensor:
        return reference(pixel_values=x).last_hidden_state[:, prefix:]

    with torch.inference_mode():
        error = ((ours(pixels) - run_ref(pixels)).abs().max() / run_ref(pixels).abs().max()).item()  # also warms up
        ref_times, our_times = [], []
        for i in range(repeats):  # interleaved, alternating which goes first
            first, second = (ref_times, run_ref), (our_times, ours)
            for times, run in (first, second) if i % 2 == 0 else (second, first):
                times.append(_seconds(run, pixels))
    return BATCH / min(ref_times), BATCH / min(our_times), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--so400m", action="store_true", help="also siglip-so400m-p14-384 (slow on 2 threads)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    keys = ["siglip-b16-224", "dinov3-vits16plus"] + (["siglip-so400m-p14-384"] if args.so400m else [])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {BATCH}, best of {args.repeats}")
    print(f"{'encoder':<24}{'reference img/s':>16}{'tinyvlm img/s':>15}{'ratio':>8}{'rel. error':>12}")
    for key in keys:
        reference, ours, error = bench(key, args.repeats)
        print(f"{key:<24}{reference:>16.2f}{ours:>15.2f}{ours / reference:>8.2f}{error:>12.1e}")


if __name__ == "__main__":
    main()
