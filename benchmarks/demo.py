"""The demo's published figure: ``tinyvlm demo`` with its defaults, run ``--rounds`` times, each in a fresh
folder, printing the held-out exact match (overall and per question kind), the chance level, the wall time
and the machine's load average (the accuracy is deterministic; the time is not).

    python benchmarks/demo.py [--steps 1200] [--seed 0] [--rounds 1] [--threads N]

``--threads`` (default torch's: one per core, what ``tinyvlm demo`` uses) matters: another thread count sums
the matrix products in another order, which after 1200 steps is another model (on a 2-core CPU: 94.0 % with
2 threads, 92.7 % with 1).

README.md and docs/training.md ("The demo") quote its output.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from tinyvlm.demo import CHANCE, IMAGES, STEPS, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="runs from scratch (the accuracy must not vary)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="tinyvlm-demo-bench-") as folder:
            results.append(run_demo(steps=args.steps, seed=args.seed, output=Path(folder) / "demo", show=0,
                                    progress=False))
    print(f"\n{IMAGES} images, {args.steps} steps, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} after the runs")
    for result in results:
        kinds = ", ".join(f"{kind} {value:.1%}" for kind, value in result.per_kind.items())
        print(f"held-out exact match {result.accuracy:.1%} (chance {CHANCE:.1%}; {kinds}) in {result.seconds:.0f} s")
    if len({result.accuracy for result in results}) > 1:
        raise SystemExit("the accuracy differed between rounds: the demo is not deterministic")


if __name__ == "__main__":
    main()
