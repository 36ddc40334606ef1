"""The demo's published figure: ``tinyvlm demo`` with its defaults, run ``--rounds`` times, each in a fresh
folder, printing the held-out exact match (overall and per question kind), the chance level, the wall time
and the machine's load average (the accuracy is deterministic; the time is not).

    python benchmarks/demo.py [--steps 1200] [--seed 0] [--rounds 1] [--threads N]

``--threads`` (default 1, what ``tinyvlm demo`` uses) matters: another thread count sums the matrix products
in another order, which after 1200 steps is another model (94.0 % with 2 threads, 92.7 % with 1, on the Intel Xeon of docs/training.md).

README.md and docs/training.md ("The demo") quote its output.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from tinyvlm.demo import IMAGES, STEPS, THREADS, run_demo
from tinyvlm.evaluation.shapes import CHANCE


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), which every published figure names."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="runs from scratch (the accuracy must not vary)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS}, the demo's)")
    args = parser.parse_args()
    results = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="tinyvlm-demo-bench-") as folder:
            results.append(run_demo(steps=args.steps, seed=args.seed, output=Path(folder) / "demo", show=0,
                                    progress=False, threads=args.threads))
    print(f"\n{IMAGES} images, {args.steps} steps, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} after the runs")
    print(f"CPU: {cpu_model()}, torch's {torch.backends.cpu.get_cpu_capability()} kernels (the figure depends on them)")
    for result in results:
        kinds = ", ".join(f"{kind} {value:.1%}" for kind, value in result.per_kind.items())
        print(f"held-out exact match {result.accuracy:.1%} (chance {CHANCE:.1%}; {kinds}) in {result.seconds:.0f} s")
    if len({result.accuracy for result in results}) > 1:
        raise SystemExit("the accuracy differed between rounds: the demo is not deterministic")


if __name__ == "__main__":
    main()
