#!/usr/bin/env bash
# The prepared GPU run, one command of at most 8 minutes on a GPU machine (tinyvlm installed with its test extra:
# pip install torch -e ".[test]"; nothing is downloaded):
#
#   benchmarks/gpu.sh              # on the GPU(s)
#   benchmarks/gpu.sh --cpu-smoke  # every piece on the CPU at a tiny size (tests/test_benchmarks.py runs it)
#
# 1. benchmarks/parity.py: bf16 parity of every family with its reference (transformers; nanoVLM's math).
# 2. benchmarks/train_speed.py: nanovlm-222m shapes, full fine-tuning, bf16 autocast, eager then --compile:
#    tokens/s and MFU side by side. (The CPU smoke runs it eager on test-vlm: compiling on a CPU takes minutes.)
# 3. benchmarks/distributed.py: 2 processes (ddp, fsdp) against one, when the machine has two or more GPUs
#    (NCCL); with --cpu-smoke, 2 gloo processes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
began=$SECONDS

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    python benchmarks/parity.py --device cpu --dtype bfloat16
    python benchmarks/train_speed.py --model test-vlm --batch 2 --text 32 --steps 2 --warmup 1 --device cpu
    python benchmarks/distributed.py --device cpu --steps 3
elif [[ $# -gt 0 ]]; then
    echo "usage: benchmarks/gpu.sh [--cpu-smoke]" >&2
    exit 2
else
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    if [[ "$gpus" == "0" ]]; then
        echo "benchmarks/gpu.sh: no CUDA device visible to torch (run benchmarks/gpu.sh --cpu-smoke on a CPU)" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
    timeout 120 python benchmarks/parity.py --device cuda --dtype bfloat16
    timeout 90 python benchmarks/train_speed.py --model nanovlm-222m --batch 16 --text 448 --steps 20 --device cuda
    timeout 200 python benchmarks/train_speed.py --model nanovlm-222m --batch 16 --text 448 --steps 20 --device cuda \
        --compile
    if (( gpus > 1 )); then
        timeout 120 python benchmarks/distributed.py --device cuda --steps 6
    else
        echo "distributed: one GPU here; the 2-GPU ddp / fsdp check needs two (tests run it on the CPU with gloo)"
    fi
fi
echo "benchmarks/gpu.sh: done in $((SECONDS - began)) s"
