"""Evaluation figures on the CPU: the demo recipe's scores on held-out shapes questions in MMStar's schema,
and how long ``tinyvlm eval`` takes per 100 samples.

    python benchmarks/eval.py [--steps 1200] [--images 3000] [--held-out 300] [--threads 1] [--rounds 3]

1. Data (`tinyvlm.demo`, `tinyvlm.evaluation.shapes`): the demo's ``--images`` free-form shapes questions,
   as many multiple-choice ones ("What colour is the shape?\\nOptions: A: blue, B: red, ..." -> "B"), and
   held-out questions drawn with other seeds: ``--held-out`` in an MMStar-schema parquet, as many free-form.
2. Two models of the demo recipe with the demo's settings (``--steps`` steps of 32, lr 1e-3, all parts):
   ``demo`` trains on the free-form questions only, as ``tinyvlm demo`` does; ``demo+choice`` on both sets.
3. ``tinyvlm.evaluate`` of both on ``mmstar`` (the parquet) and ``exact_match`` (the free-form held-out
   records), batch 8: the scores, lmms-eval's MMStar metrics per category, the blind-guess chance.
4. Runtime of ``tinyvlm eval --task mmstar`` on the held-out parquet per 100 samples at batch 1 and batch 8
   (``demo+choice``; ``--rounds`` interleaved rounds, the median), with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinyvlm
from tinyvlm.data import read_records
from tinyvlm.demo import BATCH_SIZE, IMAGES, LEARNING_RATE, STEPS, build_demo_vlm, demo_tokenizer
from tinyvlm.evaluation.shapes import CHANCE, make_shapes_dataset
from tinyvlm.evaluation.shapes import choice_questions, write_mmstar_parquet, write_training_data


def train(name: str, data: Path, folder: Path, steps: int) -> Path:
    vlm = build_demo_vlm(demo_tokenizer(read_records(data)), seed=0)
    vlm.save_pretrained(folder / f"{name}-init")
    began = time.perf_counter()
    result = tinyvlm.train(
        model=f"local-dir:{folder / f'{name}-init'}", data=data, output=folder / f"{name}-run", train="all",
        max_steps=steps, batch_size=BATCH_SIZE, grad_accum=1, lr=LEARNING_RATE, warmup_steps=steps // 20,
        weight_decay=0.0, val_fraction=0, eval_samples=0, checkpoint_every=0, seed=0, device="cpu", progress=False,
    )
    print(f"trained {name}: {steps} steps in {time.perf_counter() - began:.0f} s, final loss {result.final_loss:.4f}")
    return result.model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a busy machine more are slower)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", help="keep the data and models here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="tinyvlm-eval-bench-") as scratch:
        folder = Path(args.output or scratch)
        free = make_shapes_dataset(folder / "free", count=args.images, seed=0)
        mixed = write_training_data(folder / "mixed", count=args.images, seed=0)
        mmstar = write_mmstar_parquet(folder / "held-out" / "mmstar.parquet", choice_questions(args.held_out, seed=1000))
        records = make_shapes_dataset(folder / "held-out" / "free", count=args.held_out, seed=1001)
        models = {"demo": train("demo", free, folder, args.steps), "demo+choice": train("demo+choice", mixed, folder, args.steps)}

        print(f"\nheld-out scores ({args.held_out} questions each; blind-guess chance {CHANCE:.1%} on both)")
        for name, model in models.items():
            for task, data in (("mmstar", mmstar), ("exact_match", records)):
                result = tinyvlm.evaluate(str(model), task, data=str(data), batch_size=8, progress=False)["tasks"][task]
                others = ", ".join(f"{k} {v:.1%}" for k, v in result["metrics"].items() if k != result["metric"])
                print(f"  {name:12} {task:12} {result['metric']} {result['score']:.1%}" + (f" ({others})" if others else ""))

        print(f"\ntinyvlm eval --task mmstar, {args.held_out} samples, median of {args.rounds} interleaved rounds")
        timings: dict[int, list[float]] = {1: [], 8: []}
        for _ in range(args.rounds):
            for batch in timings:
                result = tinyvlm.evaluate(str(models["demo+choice"]), "mmstar", data=str(mmstar), batch_size=batch,
                                          progress=False)["tasks"]["mmstar"]
                timings[batch].append(result["seconds_per_100_samples"])
        for batch, values in timings.items():
            print(f"  batch {batch}: {statistics.median(values):.2f} s per 100 samples "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")
        print(f"  batch 1 / batch 8: x{statistics.median(timings[1]) / statistics.median(timings[8]):.2f}")
        print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
