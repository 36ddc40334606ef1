"""Helpers for the encoder parity tests: realistic random weights and the comparison metric."""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter with a realistic spread, so that ignoring any of them changes the output.

    Matrices ~ N(0, 1/fan_in) (activations keep their scale through the layers), biases ~ N(0, 0.1),
    norm weights ~ 1 + N(0, 0.2), LayerScale ~ 0.5 + N(0, 0.2), tokens and position tables ~ N(0, 0.5).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                value = 1 + 0.2 * normal(param.shape)
            elif leaf == "lambda1":
                value = 0.5 + 0.2 * normal(param.shape)
            elif param.ndim == 1 or leaf.endswith("bias"):
                value = 0.1 * normal(param.shape)
            elif "token" in leaf or "position_embedding" in name or leaf == "probe":
                value = 0.5 * normal(param.shape)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else 1
                value = normal(param.shape) / math.sqrt(fan_in)
            param.copy_(value)
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: the parity metric of the brief."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
