"""Training speed of a recipe's shapes on one device: tokens/s and MFU of full fine-tuning steps.

    python benchmarks/train_speed.py [--model nanovlm-222m] [--batch 16] [--text 448] [--steps 20] [--compile]
        [--precision bf16] [--device cuda] [--peak-tflops X]

The model is the recipe built from its config alone (random weights, no download; the VLM module the
training loop trains), trained in full: forward with the loss on the text tokens, backward, fused AdamW, under
bf16 autocast (``--precision bf16``) and ``torch.compile`` (``--compile``), as ``tinyvlm train`` does. Each
sample is one image at the encoder's size and ``--text`` text tokens. The first ``--warmup`` steps (compilation,
allocations) are not timed; tokens/s counts image + text tokens of the decoder.

MFU = model FLOPs per second / the device's peak dense bf16 FLOPs (a table of common GPUs, or
``--peak-tflops``). Model FLOPs per step: 6 × (decoder parameters without the embedding table) × decoder
tokens + 12 × layers × width × sequence length × decoder tokens (attention scores; PaLM's formula) + 6 ×
encoder parameters × patches (every image through the vision tower, its own attention left out).
"""

from __future__ import annotations

import argparse
import time

import torch

import tinyvlm
from tinyvlm.vlm.model import assemble

#: Peak dense bf16 tensor FLOPs, by a substring of the device name (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
               "RTX 4090": 165.2, "RTX 3090": 71.0}


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nanovlm-222m", help="a VLM recipe of the zoo")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=448, help="text tokens per sample")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: the table)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    vlm = assemble(tinyvlm.get_spec(args.model).config).to(device).train()
    encoder = vlm.encoder.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, encoder.image_size, encoder.image_size, generator=generator).to(device)
    with torch.no_grad():
        side = encoder.image_size // encoder.patch_size
        image_tokens = vlm.projector(vlm.encoder(pixels[:1]), (side, side)).shape[1]
    length = image_tokens + args.text
    ids = torch.randint(3, vlm.decoder.config.vocab_size, (args.batch, length), generator=generator).to(device)
    ids[:, :image_tokens] = vlm.image_token_id
    labels = ids.clone()
    labels[:, :image_tokens] = -100
    model = torch.compile(vlm) if args.compile else vlm
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    began = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - began) / args.steps

    decoder = vlm.decoder.config
    embedding = vlm.decoder.embed_tokens.weight.numel()
    decoder_params = sum(p.numel() for p in vlm.decoder.parameters()) - embedding
    decoder_params += embedding if vlm.decoder.lm_head is None else 0  # a tied head still multiplies
    encoder_params = sum(p.numel() for p in vlm.encoder.parameters())
    patches = (encoder.image_size // encoder.patch_size) ** 2 * args.batch
    tokens = args.batch * length
    flops = 6 * decoder_params * tokens + 12 * decoder.num_layers * decoder.hidden_size * length * tokens \
        + 6 * encoder_params * patches
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} shapes, full fine-tuning, {args.precision}{' autocast' if args.precision == 'bf16' else ''}"
          f"{', torch.compile' if args.compile else ''}, on {name}: batch {args.batch} x ({image_tokens} image + "
          f"{args.text} text) tokens, {sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M parameters")
    mfu = f"MFU {flops / seconds / peak:.1%} (peak {peak / 1e12:.0f} TFLOPs)" if peak else "MFU n/a (no peak known)"
    print(f"train step: {seconds * 1e3:.1f} ms, {tokens / seconds:,.0f} tokens/s, "
          f"{flops / seconds / 1e12:.2f} model TFLOPs/s, {mfu}; warm-up {warmup_s:.1f} s ({args.warmup} steps)")


if __name__ == "__main__":
    main()
