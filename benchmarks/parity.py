"""Low-precision parity of every family with its reference, on a device: the tests' tiny random twins
(``tests/*/`` twin writers: the Hub layouts, saved by transformers) run by transformers and by tinyvlm.

    python benchmarks/parity.py [--device cuda] [--dtype bfloat16]

Families: SigLIP (``SiglipModel``; SigLIP2's fixed-resolution checkpoints have this layout), DINOv3
(``DINOv3ViTModel``), Llama / SmolLM2 (``LlamaForCausalLM``), Gemma-3 (``Gemma3ForCausalLM``), SmolVLM
(``Idefics3ForConditionalGeneration``), and nanoVLM against nanoVLM's math (``tests/formats/nanovlm_reference.py``:
nanoVLM is not in transformers). For each: the fp32 reference output on the device, then tinyvlm's and the
reference's outputs in ``--dtype``; the relative max error of each against the fp32 reference, side by side.
tinyvlm passes when its error is at most twice the reference's own (or under one ``--dtype`` epsilon), and,
in fp32 on the device, within 1e-4 of the reference (TF32 off). Exit status 1 if any family fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for folder in ("tests/decoders", "tests/encoders", "tests/formats"):
    sys.path.insert(0, str(ROOT / folder))

import tinyvlm  # noqa: E402

#: A family's check: (reference, ours, run) with run(model, dtype) -> output tensor (the same inputs each time).
Case = tuple[nn.Module, nn.Module, Callable[[nn.Module, torch.dtype], torch.Tensor]]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def siglip(folder: Path, device: torch.device) -> Case:
    import transformers
    from encoder_twins import randomize_
    from test_siglip import TEXT, VISION

    model = transformers.SiglipModel._from_config(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT),
                                                  attn_implementation="eager")
    randomize_(model, seed=0).eval()
    model.save_pretrained(folder)
    ours = tinyvlm.build_encoder(f"local-dir:{folder}", dtype=torch.float32)
    pixels = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1)).to(device)
    reference = model.vision_model

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        x = pixels.to(dtype)
        return m(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state if m is reference else m(x)

    return reference, ours, run


def dinov3(folder: Path, device: torch.device) -> Case:
    import transformers
    from encoder_twins import randomize_
    from test_dinov3 import TINY

    model = transformers.DINOv3ViTModel._from_config(transformers.DINOv3ViTConfig(**TINY, use_gated_mlp=True,
                                                     hidden_act="silu"), attn_implementation="eager")
    randomize_(model, seed=2).eval()
    model.save_pretrained(folder)
    ours = tinyvlm.build_encoder(f"local-dir:{folder}", dtype=torch.float32)
    pixels = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)).to(device)
    skip = 1 + TINY["num_register_tokens"]

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        x = pixels.to(dtype)
        return m(pixel_values=x).last_hidden_state[:, skip:] if m is model else m(x)

    return model, ours, run


def decoder_case(reference: nn.Module, folder: Path, device: torch.device) -> Case:
    reference.save_pretrained(folder)
    ours = tinyvlm.build_decoder(f"local-dir:{folder}", dtype=torch.float32)
    ids = torch.randint(3, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return m(ids).logits

    return reference, ours, run


def llama(folder: Path, device: torch.device) -> Case:
    from test_llama import make_twin

    reference, _ = make_twin("llama32", folder)
    return decoder_case(reference, folder / "saved", device)


def gemma3(folder: Path, device: torch.device) -> Case:
    import transformers
    from decoder_twins import randomize_

    config = transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    reference = randomize_(transformers.Gemma3ForCausalLM(config), seed=3, norm_offset=0.0).eval()
    return decoder_case(reference, folder, device)


def smolvlm(folder: Path, device: torch.device) -> Case:
    import numpy as np
    from PIL import Image
    from twins import hf_processor, write_smolvlm_twin

    reference = write_smolvlm_twin(folder, model_type="idefics3", scale_factor=2, do_image_splitting=True)
    ours = tinyvlm.load_vlm(f"local-dir:{folder}", dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    processor = hf_processor(folder)
    content = [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    expected = {k: v.to(device) for k, v in processor(text=prompt, images=[image], return_tensors="pt").items()}
    batch = ours.processor("<image>What is in this image?", [image])
    ids, pixels = batch["input_ids"].to(device), batch["pixel_values"].to(device)

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if m is reference:
            return m(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in expected.items()}).logits
        return m(ids, pixels.to(dtype)).logits

    return reference, ours, run


def nanovlm(folder: Path, device: torch.device) -> Case:
    import numpy as np
    from PIL import Image
    from twins import write_nanovlm_twin

    reference = write_nanovlm_twin(folder / "nanovlm", image_token=None, tied=True)
    ours = tinyvlm.load_vlm(f"local-dir:{folder / 'nanovlm'}", dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    batch = ours.processor("Question: What colour is the shape? Answer:", [image], raw=True)
    ids, pixels = batch["input_ids"].to(device), batch["pixel_values"].to(device)
    text_ids = ids[:, (ids[0] == ours.image_token_id).sum() :]  # v0.1: nanoVLM puts the image before the text itself

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if m is not reference:
            return m(ids, pixels.to(dtype)).logits
        # nanoVLM runs low precision under autocast (its rotary tables stay fp32): its weights stay fp32 here
        reference.float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return m(text_ids, pixels)

    return reference, ours, run


FAMILIES = {"siglip": siglip, "dinov3": dinov3, "llama": llama, "gemma3": gemma3, "smolvlm": smolvlm,
            "nanovlm": nanovlm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    epsilon = torch.finfo(dtype).eps
    print(f"parity on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.dtype}; relative max error against the fp32 reference")
    print(f"{'family':10} {'fp32 ours':>10} {args.dtype + ' ours':>16} {args.dtype + ' reference':>20}  verdict")
    failed = []
    with tempfile.TemporaryDirectory(prefix="tinyvlm-parity-") as scratch, torch.no_grad():
        for name, make in FAMILIES.items():
            torch.manual_seed(0)
            reference, ours, run = make(Path(scratch) / name, device)
            reference, ours = reference.to(device).eval(), ours.to(device).eval()
            expected = run(reference, torch.float32)
            fp32 = rel(run(ours, torch.float32), expected)
            low_ours = rel(run(ours.to(dtype), dtype), expected)
            low_reference = rel(run(reference.to(dtype), dtype), expected)
            ok = fp32 <= 1e-4 and low_ours <= max(2 * low_reference, epsilon)
            failed += [] if ok else [name]
            print(f"{name:10} {fp32:10.1e} {low_ours:16.2e} {low_reference:20.2e}  {'ok' if ok else 'FAIL'}")
    if failed:
        raise SystemExit(f"parity failed: {', '.join(failed)}")
    print("parity: every family ok")


if __name__ == "__main__":
    main()
