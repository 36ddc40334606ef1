"""Trainable parameters and adapter size of a LoRA run, measured without weights (meta device).

Builds a zoo VLM on the meta device (no download), injects LoRA as ``tinyvlm train --lora RANK`` does
(`tinyvlm.interop.lora.add_lora`, the projector trained in full), counts the trainable parameters, then gives
only the adapter's tensors real (zero) storage and writes the adapter with `save_adapter`, whose
``adapter_model.safetensors`` size is the size of every adapter of that shape.

Run: ``python benchmarks/lora_size.py [--model nanovlm-222m] [--rank 8] [--targets q,k,v,o,gate,up,down]
[--parts decoder]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import tinyvlm
from tinyvlm.interop.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, count_parameters, save_adapter
from tinyvlm.interop.lora_settings import DEFAULT_TARGETS, LoraSettings
from tinyvlm.vlm.model import assemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nanovlm-222m", help="a zoo VLM (recipe or trained entry)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--parts", default="decoder")
    args = parser.parse_args()

    with torch.device("meta"):
        vlm = assemble(tinyvlm.get_spec(args.model, kind="vlm").config)
    settings = LoraSettings(rank=args.rank, targets=tuple(args.targets.split(",")), parts=tuple(args.parts.split(",")))
    add_lora(vlm, settings, full_parts=("projector",), base_name=args.model)
    trainable, total = count_parameters(vlm)
    lora = sum(p.numel() for n, p in vlm.named_parameters() if ".lora_" in n)
    with torch.no_grad():
        for module in vlm.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    setattr(module, name, torch.nn.Parameter(torch.zeros(param.shape)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(vlm, Path(tmp) / "adapter")
        weights, config = (folder / ADAPTER_WEIGHTS).stat().st_size, (folder / ADAPTER_CONFIG).stat().st_size
    print(f"{args.model}, LoRA rank {args.rank} on {args.targets} of the {args.parts}, projector trained in full")
    print(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %): "
          f"LoRA {lora:,} + projector {trainable - lora:,}")
    print(f"  adapter_model.safetensors: {weights:,} bytes (fp32); adapter_config.json: {config:,} bytes")


if __name__ == "__main__":
    main()
