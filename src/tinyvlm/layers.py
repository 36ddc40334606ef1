"""Layers shared by the families, written once: norms, MLPs, activations and rotary helpers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Activation names as they appear in Hugging Face configs (``hidden_act`` / ``hidden_activation``).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    from tinyvlm.errors import ConfigError

    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32. ``unit_offset`` scales by ``1 + w`` (Gemma) instead of ``w``."""

    def __init__(self, dim: int, eps: float = 1e-6, *, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma multiplies in fp32, then casts
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)  # Llama casts, then multiplies


class MLP(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))`` (ViT / SigLIP / LLaVA projector)."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool = True, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (Llama, DINOv3+) or GeGLU-tanh (Gemma)."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * lambda1`` (DINOv3)."""

    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension: the rotate-half form of RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by angles given as ``cos`` / ``sin`` tables broadcastable to it."""
    return x * cos + rotate_half(x) * sin
