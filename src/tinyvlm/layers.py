"""Layers shared by the families, written once: norms, MLPs, activations, attention and rotary helpers.

The forwards here are the plain math, as the papers write it. What makes decoding fast (fused projections,
products split over threads, weight layouts, quantized kernels) lives in `tinyvlm.inference`, which swaps
these modules for its subclasses (`tinyvlm.inference.prepare_for_inference`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import Field

from tinyvlm.config import ACTIVATION_NAMES, Config
from tinyvlm.errors import ConfigError

#: Activation names as they appear in Hugging Face configs (``hidden_act`` / ``hidden_activation``); configs
#: validate against the same names (`tinyvlm.config.ACTIVATION_NAMES`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def activation(name: str) -> Callable[[Tensor], Tensor]:
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
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps) [* weight] as the references do, in fewer ops.
        if self.unit_offset:  # Gemma multiplies in fp32, then casts
            return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)  # Llama casts, then multiplies


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


class Embedding(nn.Embedding):
    """A decoder's token embedding, which is also its LM head when the two are tied (`as_head`) and grows
    with added tokens (`grow_to`). A quantized table (`tinyvlm.inference.quantize.QuantizedEmbedding`) has
    the same two methods."""

    def as_head(self, hidden: Tensor) -> Tensor:
        """Logits of ``hidden [..., dim]`` against every row: ``hidden @ weight.T``."""
        return F.linear(hidden, self.weight)

    @torch.no_grad()
    def grow_to(self, rows: int) -> None:
        """Append rows up to ``rows`` in all, each the mean of the existing rows."""
        self.weight = nn.Parameter(grown(self.weight, rows))
        self.num_embeddings = rows


def grown(weight: Tensor, rows: int) -> Tensor:
    """``weight [n, d]`` with rows appended up to ``rows``, each the mean of the ``n`` (computed in fp32)."""
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat((weight, mean.expand(rows - weight.shape[0], -1)))


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension: the rotate-half form of RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by angles given as ``cos`` / ``sin`` tables broadcastable to it."""
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------------ decoders


class RopeConfig(Config):
    """Rotary embedding frequencies: ``theta`` and an optional static rescaling of the frequencies.

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low frequencies by ``factor``,
    keeps the high ones and interpolates in between (Llama-3.1+). Both keep the cos/sin amplitude at 1.
    """

    theta: float = Field(gt=0)
    type: Literal["default", "linear", "llama3"] = "default"
    factor: float = Field(1.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, *, theta: float | None = None) -> "RopeConfig":
        """Read a ``rope_parameters`` (transformers v5) or legacy ``rope_scaling`` dict; ``theta`` is the
        legacy top-level ``rope_theta`` when the dict does not carry it."""
        params = dict(params or {})
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        theta = params.pop("rope_theta", theta)
        if theta is None:
            raise ConfigError("config.json gives no rope_theta")
        if rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"RoPE type {rope_type!r} is not implemented (supported: default, linear, llama3); "
                "open an issue if you need it."
            )
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        values = {name: params[name] for name in fields if params.get(name) is not None}
        if rope_type == "default":
            values = {}
        return cls(theta=theta, type=rope_type, **values)

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_parameters`` dict transformers v5 writes for these frequencies (`from_hf` reads it back)."""
        params: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type == "linear":
            params["factor"] = self.factor
        elif self.type == "llama3":
            params.update(factor=self.factor, low_freq_factor=self.low_freq_factor,
                          high_freq_factor=self.high_freq_factor,
                          original_max_position_embeddings=self.original_max_position_embeddings)
        return params


def rope_inv_freq(head_dim: int, rope: RopeConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies ``theta^(-2i/d)`` (fp32, as transformers computes them), rescaled per ``rope.type``."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotate-half RoPE for given positions (angles ``[p * f, p * f]``, concatenated)."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)
        self._table: tuple[Tensor, Tensor] | None = None  # cos, sin [positions, head_dim] (see `lookup`)

    def materialize_buffers(self, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(self.head_dim, self.rope, device)
        self._table = None

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``position_ids [B, T]`` -> ``cos, sin [B, 1, T, head_dim]`` in ``dtype`` (computed in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def lookup(self, position_ids: Tensor, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`forward` for ``position_ids`` known to be below ``end``, read from fp32 tables of positions
        ``0 .. end - 1`` that are kept between calls (grown by doubling). A decoding step then indexes two rows
        instead of computing cos / sin, which on CPU opens a parallel region once ``head_dim > 64``."""
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != position_ids.device:
            size = max(end, 2 * table[0].shape[0]) if table is not None else end
            positions = torch.arange(size, device=position_ids.device)[None]
            table = self._table = tuple(t[0, 0] for t in self(positions, torch.float32))
        cos, sin = table
        return cos[position_ids][:, None].to(dtype), sin[position_ids][:, None].to(dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention of the vision encoders: q, k, v and o projections with biases
    (none on k when ``key_bias`` is False, as DINOv3), and optionally RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, *, key_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, RoPE, optional per-head q/k RMSNorm and a KV cache.

    Each key/value head serves ``num_heads / num_kv_heads`` consecutive query heads. ``window`` (sliding
    attention) only tells the cache how many past keys this layer must keep; the mask enforces it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        bias: bool = False,
        qk_norm_eps: float | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window = window
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        if qk_norm_eps is not None:  # Gemma-3: RMSNorm(1 + w) over head_dim, after the head split, before RoPE
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, unit_offset=True)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: "LayerCache | None" = None,
    ) -> Tensor:
        """``x [B, T, D]``; ``mask``: boolean ``[B|1, 1, T, S]`` of allowed keys (None: all ``S`` allowed)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self.heads(q, k, v, rope, cache)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def heads(
        self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], cache: "LayerCache | None"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected ``[B, T, heads * head_dim]`` queries, keys and values -> ``[B, heads, T, head_dim]``,
        normed (q/k RMSNorm), rotated (RoPE), and the keys and values extended by the cache (all it holds)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        return q, k, v


class LayerCache(Protocol):
    """One layer's view of a KV cache: stores the new keys/values, returns all those to attend to."""

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...
