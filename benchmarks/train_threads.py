"""Training speed at the default (automatic) thread count vs one thread, on the machine as it is and with one
core kept busy by another process, in one interleaved run.

    python benchmarks/train_threads.py [--steps 40] [--rounds 3] [--busy]

The run is `tinyvlm demo`'s: its 3.4M-parameter VLM (test-siglip + pixel-shuffle-mlp + test-llama, 512-token
tokenizer) trained in full on its shapes dataset, batch 32, through `tinyvlm.train` (the real training loop,
data loading included). Each training runs in a fresh process, once with ``threads`` left out (torch's count,
tuned per step between it and one by `tinyvlm.inference.threads.ThreadTuner`) and once with ``threads=1``; the two
alternate, ``--rounds`` times. Tokens/s is the median over the logged windows of 10 steps after the first
(the first holds the warm-up). ``--busy`` repeats everything with ``python -c "while True: pass"`` running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WINDOW = 10


def child(folder: Path, threads: int | None, steps: int, run: Path) -> None:
    """One training (in this process); prints its tokens/s."""
    import tinyvlm
    from tinyvlm.demo import BATCH_SIZE, LEARNING_RATE

    tinyvlm.train(
        model=f"local-dir:{folder / 'init'}", data=folder / "data" / "data.jsonl", output=run, train="all",
        max_steps=steps, batch_size=BATCH_SIZE, grad_accum=1, lr=LEARNING_RATE, weight_decay=0.0, eval_samples=0,
        checkpoint_every=0, device="cpu", progress=False, log_every=WINDOW, threads=threads,
    )
    windows = [json.loads(line)["tokens_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "tokens_per_s" in line]  # fmt: skip
    print(json.dumps({"tokens_per_s": statistics.median(windows[1:] or windows)}))


def prepare(folder: Path) -> None:
    from tinyvlm.data import read_records
    from tinyvlm.demo import build_demo_vlm, demo_tokenizer
    from tinyvlm.evaluation.shapes import make_shapes_dataset

    data = make_shapes_dataset(folder / "data", count=800, seed=0)
    build_demo_vlm(demo_tokenizer(read_records(data)), seed=0).save_pretrained(folder / "init")


def measure(folder: Path, threads: int | None, steps: int) -> float:
    with tempfile.TemporaryDirectory(dir=folder) as run:
        command = [sys.executable, __file__, "--child", str(folder), "--steps", str(steps),
                   "--threads", "auto" if threads is None else str(threads), "--run", str(Path(run) / "run")]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default is torch's own
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="also measure with one core kept busy")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, None if args.threads == "auto" else int(args.threads), args.steps, args.run)
        return
    with tempfile.TemporaryDirectory(prefix="train-threads-") as tmp:
        folder = Path(tmp)
        prepare(folder)
        print(f"tinyvlm demo VLM, train=all, batch 32, {args.steps} steps per run, {args.rounds} interleaved rounds, "
              f"{os.cpu_count()} cores")
        for condition in (["as is", "one core busy"] if args.busy else ["as is"]):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition != "as is" else None
            try:
                time.sleep(0.5 if spinner else 0)
                load = Path("/proc/loadavg").read_text().split()[0]
                rates: dict[str, list[float]] = {"default (automatic)": [], "threads=1": []}
                for _ in range(args.rounds):
                    rates["default (automatic)"].append(measure(folder, None, args.steps))
                    rates["threads=1"].append(measure(folder, 1, args.steps))
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
            best = {name: max(values) for name, values in rates.items()}
            print(f"\n{condition} (load {load})")
            for name, values in rates.items():
                print(f"  {name:20} tokens/s best {max(values):8.0f}  median {statistics.median(values):8.0f}  "
                      f"worst {min(values):8.0f}")
            print(f"  default / threads=1 (best vs best): x{best['default (automatic)'] / best['threads=1']:.2f}")


if __name__ == "__main__":
    main()
