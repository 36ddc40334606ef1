"""Data-loading throughput: samples/s of the training input pipeline with 0, 1, 2, ... DataLoader workers.

    python benchmarks/data.py [--rows 384] [--workers 0 1 2] [--batch 8] [--threads 1]

It writes a synthetic the_cauldron-style parquet file itself (``images``: one JPEG of 480-800 x 360-600
pixels per row, stored by ``datasets`` as an ``Image`` feature; ``texts``: 1-3 {user, assistant, source}
turns) and reads it exactly as ``tinyvlm train`` does: the stream (block shuffle, held-out rows), schema
conversion in the main process, then in the workers image decoding, preprocessing, tokenisation and
collation into padded micro-batches. Nothing trains; the model's parts are tiny, only their image
preprocessing has the real sizes:

* ``224``: nanovlm-222m's (SigLIP-B/16-224, one 224 x 224 view per image, 49 image tokens);
* ``512-split``: nanoVLM's current layout (512 x 512 views, images split into up to 4 x 4 tiles plus a global
  view, 64 tokens per view).

Prints samples/s and image views/s per worker count for each. A GPU step that trains B samples in T seconds
needs B / T samples/s; data loading keeps up when the figure here (for the workers you give) is above that.
Each worker is one process: the figure grows with workers until the CPU cores are used up, so state the
machine's core count and load with the numbers.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import tinyvlm
from tinyvlm.data.loading import Collator, SampleMaker, load
from tinyvlm.data.schemas import RatingFilter
from tinyvlm.data.readers import open_rows, parse_source
from tinyvlm.data.stream import Mixture, RowSource, StepBatches

LAYOUTS = {
    "224": dict(encoder_kwargs={"image_size": 224, "patch_size": 16}, projector_kwargs={"factor": 2},
                processor_kwargs={}),
    "512-split": dict(encoder_kwargs={"image_size": 512, "patch_size": 16}, projector_kwargs={"factor": 4},
                      processor_kwargs={"split_images": True, "max_grid": 4}),
}


def write_cauldron(path: Path, rows: int, seed: int = 0) -> Path:
    from datasets import Dataset, Features, Image as ImageFeature, List, Value

    rng = random.Random(seed)
    records = []
    for i in range(rows):
        width, height = rng.randint(480, 800), rng.randint(360, 600)
        picture = Image.effect_noise((width, height), rng.randint(20, 80)).convert("RGB")  # JPEG-realistic entropy
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        turns = [{"user": f"Question {t} about picture {i}: what is in the upper left corner?",
                  "assistant": "A grey, grainy texture without any recognisable object.", "source": "synthetic"}
                 for t in range(rng.randint(1, 3))]
        records.append({"images": [{"bytes": buffer.getvalue(), "path": f"{i}.jpg"}], "texts": turns})
    string = Value("string")
    features = Features({"images": List(ImageFeature()),
                         "texts": List({"user": string, "assistant": string, "source": string})})
    Dataset.from_list(records, features=features).to_parquet(str(path))
    return path


def measure(path: Path, layout: str, workers: int, batch: int, steps: int) -> tuple[float, float]:
    """(samples/s, views/s) of ``steps`` micro-batches of ``batch`` samples, after one warm-up batch."""
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", pretrained=False, **LAYOUTS[layout])
    processor = vlm.processor
    rows = open_rows(parse_source(str(path)), "train")
    source = RowSource(rows, seed=0, index=0, block=1000, val_fraction=0.0, ratings=RatingFilter())
    stream = StepBatches(Mixture([source], None, seed=0), micro_batch=batch, world_size=1, rank=0, accumulation=1)
    micro_batches = load(stream.iterate(0, steps + 1), SampleMaker(processor, max_length=None),
                         Collator(pad_id=processor.pad_token_id, packed=False, max_length=None),
                         workers=workers, prefetch_factor=2, pin_memory=False)
    next(micro_batches)  # workers started, first batch ready
    began = time.perf_counter()
    samples = views = 0
    for micro in micro_batches:
        samples += micro.batch.num_samples
        views += micro.batch.pixel_values.shape[0]
    seconds = time.perf_counter() - began
    return samples / seconds, views / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=384, help="rows of the synthetic parquet file")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the workers' too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.rows // args.batch - 1
    with tempfile.TemporaryDirectory() as folder:
        path = write_cauldron(Path(folder) / "cauldron.parquet", args.rows)
        size = path.stat().st_size / 2**20
        print(f"{args.rows} the_cauldron-style rows ({size:.0f} MiB parquet), micro-batches of {args.batch}, "
              f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
        print(f"{'layout':10} {'workers':>7} {'samples/s':>10} {'views/s':>9}")
        for layout in args.layouts:
            for workers in args.workers:
                samples, views = measure(path, layout, workers, args.batch, steps)
                print(f"{layout:10} {workers:>7} {samples:>10.1f} {views:>9.1f}", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
