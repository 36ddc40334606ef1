"""benchmarks/gpu.sh, the prepared GPU run: its CPU smoke path runs every piece (parity of every family, the
training-speed step, 2 processes under ddp and fsdp) at a tiny size, so that the script is known to work before
a GPU machine is at hand."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu.sh"


def test_gpu_script_cpu_smoke() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for family in ("siglip", "dinov3", "llama", "gemma3", "smolvlm", "nanovlm"):
        assert re.search(rf"^{family} +\S+ +\S+ +\S+  ok$", out, re.M), (family, out)
    assert "parity: every family ok" in out
    assert re.search(r"train step: [\d.]+ ms, [\d,]+ tokens/s", out), out
    match = re.search(r"largest relative loss difference ddp (\S+), fsdp (\S+)", out)
    assert match and max(float(match[1]), float(match[2])) <= 1e-5, out
    assert "distributed: ddp and fsdp ok" in out and "benchmarks/gpu.sh: done in" in out


def test_gpu_script_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full run is benchmarks/gpu.sh itself, not a test")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no CUDA device visible to torch" in done.stderr
    wrong = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "usage: benchmarks/gpu.sh [--cpu-smoke]" in wrong.stderr


def test_quality_w8a8_experiment_runs_fbgemm_on_every_int8_product(monkeypatch) -> None:
    """benchmarks/quality.py's ``w8a8`` modes: inside the block every int8 product is fbgemm's (its activation
    rounding moves the logits a little), outside it tinyvlm's own again."""
    import sys

    import tinyvlm
    from tinyvlm.inference.quantize import QuantizedMatrix

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    sys.modules.pop("quality", None)
    import quality

    decoder = tinyvlm.build_decoder("test-llama", quantize="int8")
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    own_product = QuantizedMatrix._product
    products = []
    monkeypatch.setattr(QuantizedMatrix, "_product", lambda matrix, flat: products.append(matrix) or own_product(matrix, flat))
    with torch.inference_mode():
        own = decoder(ids).logits
        monkeypatch.setattr(QuantizedMatrix, "_product", own_product)
        calls = []
        fbgemm = torch.ops.quantized.linear_dynamic
        monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", lambda *a: calls.append(a[2]) or fbgemm(*a))
        with quality.fbgemm_products(reduce_range=False):
            rounded = decoder(ids).logits
        assert QuantizedMatrix._product is own_product
        again = decoder(ids).logits
    assert len(products) > 0 and calls == [False] * (len(products) * 7)  # every product, one call per row
    assert torch.equal(again, own) and not torch.equal(rounded, own)
    assert (rounded - own).abs().max() <= 0.05 * own.abs().max()
