"""Peak memory of loading the real Gemma-3 270M with and without quantization (``quantize=`` at load).

    python benchmarks/quant_memory.py [--modes fp32 int8 int4]

Each mode loads the Hub-layout fp32 folder (real_gemma.py; 1.07 GB of fp32 on disk) in a fresh process with
``tinyvlm.build_decoder("local-dir:...", dtype=torch.float32, quantize=mode)`` and prints the size of the
model's tensors and the rise of the process's peak resident set (``VmHWM``) over its baseline after
importing torch and tinyvlm (and building a test decoder, so that one-time setup is not counted). With
``quantize=`` the checkpoint is read in blocks of rows and quantized block by block (`tinyvlm.inference.quantize`),
so the peak stays near the quantized size instead of the fp32 one. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, sys, torch, tinyvlm

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

folder, mode = sys.argv[1], sys.argv[2]
quantize = None if mode == "fp32" else mode
tinyvlm.build_decoder("test-llama", pretrained=False, quantize=quantize)  # imports and one-time setup
base = peak_mb()
decoder = tinyvlm.build_decoder("local-dir:" + folder, dtype=torch.float32, quantize=quantize)
tensors = {id(t): t for t in [*decoder.parameters(), *decoder.buffers()]}
size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
print(json.dumps({"tensors_mb": size, "peak_rise_mb": peak_mb() - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    args = parser.parse_args()
    from real_gemma import real_gemma_folder

    folder = real_gemma_folder()
    disk = (folder / "model.safetensors").stat().st_size / 2**20
    print(f"Gemma-3 270M (real weights), model.safetensors {disk:.0f} MiB (fp32)")
    print(f"{'mode':5} {'tensors MiB':>12} {'peak RSS rise MiB':>18} {'peak / tensors':>15}")
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:5} {row['tensors_mb']:12.0f} {row['peak_rise_mb']:18.0f} {row['peak_rise_mb'] / row['tensors_mb']:15.2f}")


if __name__ == "__main__":
    main()
