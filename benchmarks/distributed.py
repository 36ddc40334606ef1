"""Two processes against one: ``tinyvlm train`` under ``torchrun --nproc-per-node 2`` with ``--strategy ddp`` and
``--strategy fsdp`` (+ activation checkpointing) gives the losses of one process with twice the batch.

    python benchmarks/distributed.py [--device cuda] [--steps 6]

On a machine with two or more GPUs the processes use NCCL and one GPU each; with ``--device cpu`` gloo on the
CPU (what the tests do). The model is ``test-vlm`` trained in full, fp32 (``--precision fp32``: bf16 rounding
would differ with the split), on the demo's shapes. Prints the largest relative loss difference of each
strategy; exit status 1 when one is above 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tinyvlm.evaluation.shapes import make_shapes_dataset


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="tinyvlm-distributed-") as scratch:
        folder = Path(scratch)
        data = make_shapes_dataset(folder / "shapes", count=64, seed=1)
        common = ["train", "--model", "test-vlm", "--data", str(data), "--train", "all", "--max-steps", str(args.steps),
                  "--grad-accum", "2", "--log-every", "1", "--checkpoint-every", "0", "--eval-samples", "0",
                  "--no-progress", "--lr", "1e-3", "--precision", "fp32", "--device", args.device]
        subprocess.run([sys.executable, "-m", "tinyvlm.cli", *common, "--batch-size", "4", "--output",
                        str(folder / "one")], check=True, env=env)
        one = losses(folder / "one")
        worst = {}
        for strategy, extra in (("ddp", []), ("fsdp", ["--activation-checkpointing"])):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "tinyvlm.cli", *common, "--batch-size", "2", "--strategy", strategy, *extra,
                            "--output", str(folder / strategy)], check=True, env=env)
            two = losses(folder / strategy)
            assert len(two) == len(one) == args.steps, (one, two)
            worst[strategy] = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"2 processes ({args.device}) vs 1 with twice the batch, {args.steps} steps: largest relative loss "
          "difference " + ", ".join(f"{name} {value:.1e}" for name, value in worst.items()))
    if max(worst.values()) > 1e-5:
        raise SystemExit("distributed: a strategy's losses differ from one process by more than 1e-5")
    print("distributed: ddp and fsdp ok")


if __name__ == "__main__":
    main()
