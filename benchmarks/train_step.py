"""Training-step speed on the CPU: projector-only and full fine-tuning, tinyvlm vs transformers in one run.

    python benchmarks/train_step.py [--batch 4] [--text 64] [--steps 3] [--threads 2]

Model: the ``nanovlm-222m`` recipe (SigLIP-B/16-224 + pixel shuffle 2 + Linear + SmolLM2-135M) with random
weights, fp32. Reference: transformers' Idefics3 (SmolVLM's architecture: SigLIP-style vision tower, pixel
shuffle 2 + bias-free Linear, Llama decoder) with the same shapes, random weights. Each sample is one
224x224 image (49 image tokens) and ``--text`` text tokens; the loss is on the last 16 tokens.

One step = forward, backward, AdamW step. Projector-only: encoder and decoder frozen (no weight gradients,
but the backward still runs through the decoder to reach the projector; the encoder runs without autograd).
Prints tokens/s (image + text tokens per second) and tinyvlm / transformers.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import tinyvlm

IMAGE_TOKENS = 49
LABELLED = 16


def tinyvlm_model() -> tuple[nn.Module, dict[str, nn.Module], int]:
    from tinyvlm.vlm.model import assemble

    # From the recipe alone: random init, offline (no tokenizer, so the image token id is the config's -1).
    vlm = assemble(tinyvlm.get_spec("nanovlm-222m").config)
    return vlm, {"encoder": vlm.encoder, "projector": vlm.projector, "decoder": vlm.decoder}, vlm.image_token_id


def transformers_model() -> tuple[nn.Module, dict[str, nn.Module], int]:
    import transformers

    encoder = tinyvlm.get_spec("siglip-b16-224").config
    decoder = tinyvlm.get_spec("smollm2-135m").config
    vision = transformers.Idefics3VisionConfig(
        hidden_size=encoder.hidden_size, intermediate_size=encoder.intermediate_size,
        num_hidden_layers=encoder.num_hidden_layers, num_attention_heads=encoder.num_attention_heads,
        image_size=encoder.image_size, patch_size=encoder.patch_size, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = transformers.LlamaConfig(
        vocab_size=decoder.vocab_size + 1, hidden_size=decoder.hidden_size,
        intermediate_size=decoder.intermediate_size, num_hidden_layers=decoder.num_layers,
        num_attention_heads=decoder.num_heads, num_key_value_heads=decoder.num_kv_heads,
        rms_norm_eps=decoder.rms_norm_eps, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=decoder.rope.theta,
    )
    image_token_id = decoder.vocab_size
    config = transformers.Idefics3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2, image_token_id=image_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = transformers.Idefics3ForConditionalGeneration(config).float()
    inner = model.model
    return model, {"encoder": inner.vision_model, "projector": inner.connector, "decoder": inner.text_model}, \
        image_token_id


def batch(image_token_id: int, size: int, text: int, hf: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40000, (size, IMAGE_TOKENS + text), generator=generator)
    ids[:, :IMAGE_TOKENS] = image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -LABELLED:] = ids[:, -LABELLED:]
    pixels = torch.randn(size, 3, 224, 224, generator=generator)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels[:, None] if hf else pixels}


def step_time(model: nn.Module, parts: dict[str, nn.Module], trained: tuple[str, ...], inputs, steps: int) -> float:
    model.train()
    for name, part in parts.items():
        part.requires_grad_(name in trained)
        part.train(name in trained)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, optimizer state)
        began = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.batch * (IMAGE_TOKENS + args.text)
    print(f"nanovlm-222m shapes, random fp32 weights, CPU x{args.threads} threads, batch {args.batch} x "
          f"({IMAGE_TOKENS} image + {args.text} text) = {tokens} tokens per step")
    results = {}
    for name, build in (("tinyvlm", tinyvlm_model), ("transformers", transformers_model)):
        model, parts, image_token_id = build()
        inputs = batch(image_token_id, args.batch, args.text, hf=name == "transformers")
        for mode, trained in (("projector-only", ("projector",)), ("full", ("encoder", "projector", "decoder"))):
            seconds = step_time(model, parts, trained, inputs, args.steps)
            results[name, mode] = tokens / seconds
            print(f"  {name:12} {mode:15} {seconds:6.2f} s/step  {tokens / seconds:8.0f} tokens/s")
        del model, parts
    for mode in ("projector-only", "full"):
        print(f"{mode:15} tinyvlm / transformers = {results['tinyvlm', mode] / results['transformers', mode]:.2f}")


if __name__ == "__main__":
    main()
