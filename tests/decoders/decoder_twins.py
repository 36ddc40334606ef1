"""Tiny random transformers twins of the decoder families, saved in the Hub layout, and comparison helpers."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import tinyvlm


def randomize_(model: nn.Module, seed: int, *, norm_offset: float) -> nn.Module:
    """Realistic spread: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ offset + N(0, 0.2)
    (offset 1 for Llama's ``w``, 0 for Gemma's ``1 + w``), biases ~ N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                value = norm_offset + 0.2 * noise
            elif param.ndim == 1:
                value = 0.1 * noise
            elif "embed_tokens" in name:
                value = noise
            else:
                value = noise / math.sqrt(param.shape[1])
            param.copy_(value)
    return model


def save_twin(model: nn.Module, folder: Path) -> tinyvlm.TinyVLMError:
    model.save_pretrained(folder)
    return tinyvlm.build_decoder(f"local-dir:{folder}", dtype=torch.float32)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def hf_greedy(model: nn.Module, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' greedy generate for exactly ``new`` tokens (no stop ids)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
