"""Peak memory of loading a checkpoint, relative to its size on disk.

Writes a random fp32 checkpoint (~400 MB by default) and loads it in fresh subprocesses, each measuring the
rise of its peak resident set (``VmHWM``, which counts the file pages a memory map touches as well as the
copies) over its baseline after importing torch and building the module on the meta device:

* ``tinyvlm``: `tinyvlm.weights.load_checkpoint` (meta build, tensors read one at a time and assigned);
* ``tinyvlm bf16``: the same with ``dtype=torch.bfloat16`` (cast while loading);
* ``reference``: the usual ``model = Model(); model.load_state_dict(safetensors.torch.load_file(path))``.

After loading, every parameter is read once (as a forward pass would), so that memory-mapped weights that
have not been paged in yet are counted too.

Run: ``python benchmarks/load_memory.py [--mb 400]``. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = 10

CHILD = r"""
import sys, torch
from torch import nn

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

class Model(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

mode, path, width, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from safetensors.torch import load_file
from tinyvlm.weights import KeyMap, load_checkpoint
if mode.startswith("tinyvlm"):
    with torch.device("meta"):
        model = Model(width, layers)
else:
    model = None
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident set
base = status("VmHWM")
if mode.startswith("tinyvlm"):
    dtype = torch.bfloat16 if mode.endswith("bf16") else None
    load_checkpoint(model, [path], KeyMap(rename=((r"(.*)", r"\1"),)), dtype=dtype)
else:
    model = Model(width, layers)
    model.load_state_dict(load_file(path))
assert not any(p.is_meta for p in model.parameters())
total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
print(status("VmHWM") - base)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=400, help="checkpoint size in MB")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    width = int((args.mb * 1e6 / 4 / LAYERS) ** 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        generator = torch.Generator().manual_seed(0)
        tensors = {}
        for i in range(LAYERS):
            tensors[f"layers.{i}.weight"] = torch.randn(width, width, generator=generator)
            tensors[f"layers.{i}.bias"] = torch.randn(width, generator=generator)
        save_file(tensors, str(path))
        del tensors
        size = path.stat().st_size
        print(f"checkpoint: {size / 1e6:.0f} MB fp32 ({LAYERS} x Linear({width}, {width}))")
        rises = {}
        for mode in ("tinyvlm", "tinyvlm-bf16", "reference"):
            result = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(path), str(width), str(LAYERS)],
                capture_output=True, text=True, check=True,
            )
            rises[mode] = int(result.stdout.strip())
            print(f"{mode:12} peak RSS rise {rises[mode] / 1e6:7.0f} MB = {rises[mode] / size:.2f} x checkpoint size")
        print(f"tinyvlm / reference peak: {rises['tinyvlm'] / rises['reference']:.2f}")


if __name__ == "__main__":
    main()
