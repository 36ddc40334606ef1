"""The shared layers (`tinyvlm.layers`) against the math they implement, written out here independently:
RMSNorm (both weightings), rotary embeddings (rotate-half = complex rotation; the tables; llama3 scaling),
attention with grouped key/value heads and masks against a softmax written by hand, the MLPs and the
embedding that doubles as the LM head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinyvlm.errors import ConfigError
from tinyvlm.layers import (
    MLP,
    Attention,
    Embedding,
    GatedMLP,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    SelfAttention,
    activation,
    apply_rotary,
    rope_inv_freq,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("unit_offset", [False, True], ids=["w", "1+w"])
def test_rms_norm_divides_by_the_root_mean_square(unit_offset: bool) -> None:
    norm = RMSNorm(8, eps=1e-5, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=generator(0)))
    x = torch.randn(2, 3, 8, generator=generator(1)) * 5
    scale = (1 + norm.weight) if unit_offset else norm.weight
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_starts_as_the_identity_scale() -> None:
    x = torch.randn(4, 8, generator=generator(2))
    unit = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    for norm in (RMSNorm(8), RMSNorm(8, unit_offset=True)):  # weight 1, or 1 + 0
        torch.testing.assert_close(norm(x), unit, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ rotary


def test_rotate_half_is_a_complex_rotation_of_the_pairs() -> None:
    """Rotate-half RoPE pairs dimension ``i`` with ``i + d/2`` and turns each pair by its angle."""
    d, positions = 8, torch.arange(5)
    rope = RotaryEmbedding(d, RopeConfig(theta=100.0))
    cos, sin = rope(positions[None], torch.float32)
    x = torch.randn(1, 1, 5, d, generator=generator(3))
    pairs = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    angles = positions[:, None].float() * rope_inv_freq(d, RopeConfig(theta=100.0))
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat((turned.real, turned.imag), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


def test_inverse_frequencies_and_their_scalings() -> None:
    d = 16
    default = rope_inv_freq(d, RopeConfig(theta=10_000.0))
    torch.testing.assert_close(default, 10_000.0 ** (-torch.arange(0, d, 2).float() / d))
    linear = rope_inv_freq(d, RopeConfig(theta=10_000.0, type="linear", factor=4.0))
    torch.testing.assert_close(linear, default / 4)
    llama3 = RopeConfig(theta=10_000.0, type="llama3", factor=8.0, original_max_position_embeddings=64)
    scaled = rope_inv_freq(d, llama3)
    wavelength = 2 * math.pi / default
    high = wavelength < 64 / 4  # short wavelengths (above high_freq_factor): kept
    low = wavelength > 64 / 1  # long ones (below low_freq_factor): divided by the factor
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], default[high])
    torch.testing.assert_close(scaled[low], default[low] / 8)
    middle = ~high & ~low
    assert torch.all(scaled[middle] <= default[middle]) and torch.all(scaled[middle] >= default[middle] / 8)


def test_rotary_lookup_is_the_forward_read_from_tables() -> None:
    rope = RotaryEmbedding(16, RopeConfig(theta=500.0))
    positions = torch.tensor([[0, 3, 9], [1, 2, 40]])
    for dtype in (torch.float32, torch.bfloat16):
        direct, table = rope(positions, dtype), rope.lookup(positions, 41, dtype)
        assert all(torch.equal(a, b) for a, b in zip(direct, table))
    assert rope.lookup(torch.tensor([[100]]), 101, torch.float32)[0].shape == (1, 1, 1, 16)  # the tables grow


def test_unsupported_rope_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="RoPE type 'yarn' is not implemented"):
        RopeConfig.from_hf({"rope_type": "yarn", "rope_theta": 1.0})


# ------------------------------------------------------------------------------------------------ attention


def reference_attention(q, k, v, scale, allowed):  # type: ignore[no-untyped-def]
    """softmax(q k^T * scale) v, each query head reading key/value head ``h // group``, disallowed keys out."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_is_grouped_softmax_attention(qk_norm: bool) -> None:
    torch.manual_seed(4)
    B, T, D, H, KV, d = 2, 5, 32, 4, 2, 8
    attention = Attention(D, H, KV, d, scale=0.3, bias=True, qk_norm_eps=1e-6 if qk_norm else None)
    x = torch.randn(B, T, D)
    rope = RotaryEmbedding(d, RopeConfig(theta=100.0))(torch.arange(T)[None].expand(B, T), torch.float32)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    out = attention(x, rope, causal)

    q = attention.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, KV, d).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, KV, d).transpose(1, 2)
    if qk_norm:
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    expected = attention.o_proj(reference_attention(q, k, v, 0.3, causal).transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    alone = attention(x[:, :1], tuple(t[:, :, :1] for t in rope), causal[..., :1, :1])  # causal: no later token
    torch.testing.assert_close(out[:, :1], alone, rtol=1e-5, atol=1e-6)


def test_attention_heads_must_group_evenly() -> None:
    with pytest.raises(ConfigError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
        Attention(12, 3, 2, 4, scale=1.0)


def test_encoder_self_attention_is_bidirectional_softmax_attention() -> None:
    torch.manual_seed(5)
    attention = SelfAttention(16, 2, key_bias=False)
    assert attention.k_proj.bias is None
    x = torch.randn(1, 6, 16)
    q, k, v = (p(x).view(1, 6, 2, 8).transpose(1, 2) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    everything = torch.ones(6, 6, dtype=torch.bool)
    expected = attention.o_proj(reference_attention(q, k, v, 8**-0.5, everything).transpose(1, 2).reshape(1, 6, 16))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ MLPs


def test_gated_mlp_is_down_of_act_gate_times_up() -> None:
    torch.manual_seed(6)
    mlp = GatedMLP(8, 16, "silu")
    x = torch.randn(3, 8)
    expected = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_is_fc2_of_act_fc1() -> None:
    torch.manual_seed(7)
    mlp = MLP(8, 16, "gelu_pytorch_tanh", out_dim=4)
    x = torch.randn(3, 8)
    hidden = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh")
    torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias, rtol=1e-5, atol=1e-6)
    assert mlp(x).shape == (3, 4)


def test_unknown_activation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported activation 'swiglu'"):
        activation("swiglu")


# ------------------------------------------------------------------------------------------------ embedding


def test_embedding_as_head_and_grown_rows() -> None:
    torch.manual_seed(8)
    embedding = Embedding(6, 4)
    hidden = torch.randn(2, 4)
    assert torch.equal(embedding.as_head(hidden), hidden @ embedding.weight.T)
    old = embedding.weight.detach().clone()
    embedding.grow_to(9)
    assert embedding.weight.shape == (9, 4) and embedding.num_embeddings == 9
    assert torch.equal(embedding.weight[:6], old)
    torch.testing.assert_close(embedding.weight[6:], old.mean(0).expand(3, 4))
    assert embedding(torch.tensor([8])).shape == (1, 4)
