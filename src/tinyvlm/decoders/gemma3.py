"""Gemma-3 text decoders (``gemma3_text``: gemma-3-270m, gemma-3-1b): embeddings scaled by sqrt(hidden)
(rounded to the compute dtype), RMSNorm with ``(1 + w)`` computed in fp32, sandwich blocks (a norm before and
after attention and MLP), per-head q/k norms before RoPE, scores scaled by ``query_pre_attn_scalar^-0.5``,
GELU-tanh gated MLP, sliding-window layers (RoPE base 10k) interleaved with global layers (RoPE base 1M),
tied head. Matches transformers' ``Gemma3ForCausalLM``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tinyvlm.config import require
from tinyvlm.decoders.base import DecoderConfig, TransformerDecoder, hf_token_ids, hf_token_value
from tinyvlm.decoders.cache import LayerKV
from tinyvlm.layers import Attention, Embedding, GatedMLP, RMSNorm, RopeConfig, RotaryEmbedding
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.weights import KeyMap

LayerType = Literal["sliding_attention", "full_attention"]


class Gemma3Config(DecoderConfig):
    family = "gemma3"

    layer_types: list[LayerType]
    sliding_window: int = Field(ge=1)
    query_pre_attn_scalar: float = Field(gt=0)
    rope_global: RopeConfig
    rope_local: RopeConfig
    final_logit_softcapping: float | None = Field(None, gt=0)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Gemma3Config":
        require(hf, "attn_logit_softcapping", None, family="gemma3")
        require(hf, "use_bidirectional_attention", False, family="gemma3")
        layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if not layer_types:
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
            ]
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers v5: one dict per layer type
            rope_global = RopeConfig.from_hf(params["full_attention"])
            rope_local = RopeConfig.from_hf(params["sliding_attention"])
        else:  # legacy keys
            rope_global = RopeConfig.from_hf(hf.get("rope_scaling"), theta=hf.get("rope_theta", 1_000_000.0))
            rope_local = RopeConfig(theta=hf.get("rope_local_base_freq", 10_000.0))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim", 256),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_activation", "gelu_pytorch_tanh"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            attention_bias=hf.get("attention_bias", False),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window", 4096),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            rope_global=rope_global,
            rope_local=rope_local,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_ids=hf_token_ids(hf.get("eos_token_id", 1)),
            pad_token_id=hf.get("pad_token_id", 0),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` of transformers' ``Gemma3ForCausalLM`` (``gemma3_text``) for this config."""
        return {
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar)
            if float(self.query_pre_attn_scalar).is_integer() else self.query_pre_attn_scalar,  # an int there
            "rope_parameters": {"full_attention": self.rope_global.to_hf(), "sliding_attention": self.rope_local.to_hf()},
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": hf_token_value(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }

    @model_validator(mode="after")
    def _one_type_per_layer(self) -> "Gemma3Config":
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        return self


class Gemma3Block(nn.Module):
    """``h = h + norm(attn(norm(h))); h = h + norm(mlp(norm(h)))`` (all norms ``1 + w``)."""

    def __init__(self, c: Gemma3Config, layer_type: LayerType) -> None:
        super().__init__()
        sliding = layer_type == "sliding_attention"
        self.rope_name = "local" if sliding else "global"
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=True)
        self.self_attn = Attention(
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            scale=c.query_pre_attn_scalar**-0.5,
            bias=c.attention_bias,
            qk_norm_eps=c.rms_norm_eps,
            window=c.sliding_window if sliding else None,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=True)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=True)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: LayerKV | None) -> Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3(TransformerDecoder):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Gemma3Block(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.rotary = nn.ModuleDict(
            {
                "global": RotaryEmbedding(config.head_dim, config.rope_global),
                "local": RotaryEmbedding(config.head_dim, config.rope_local),
            }
        )
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcap = config.final_logit_softcapping
        self.init_weights()

    def embed(self, input_ids: Tensor) -> Tensor:
        """Embeddings times sqrt(hidden), the scale rounded to the decoder's dtype first (25.25 in bf16 for
        hidden 640), as the reference does. Embeddings a VLM splices in afterwards are not scaled."""
        embeds = super().embed(input_ids)
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=embeds.dtype, device=embeds.device)
        return embeds * scale


def key_map(config: Gemma3Config) -> KeyMap:
    if config.tie_word_embeddings:
        return KeyMap(rename=((r"model\.(.*)", r"\1"),), unused=(r"lm_head\.weight",))
    return KeyMap(rename=((r"model\.(.*)", r"\1"), (r"lm_head\.weight", "lm_head.weight")))


register_family(Family("gemma3", "decoder", Gemma3Config, Gemma3, key_map, hf_model_types=("gemma3_text",)))


# --------------------------------------------------------------------------------------------------- zoo


def _gemma3(hidden: int, layers: int, intermediate: int, instruct: bool) -> Gemma3Config:
    """google/gemma-3-{270m,1b}[-it]/config.json: full attention every 6th layer, window 512."""
    return Gemma3Config(
        vocab_size=262144,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        sliding_window=512,
        query_pre_attn_scalar=256,
        rope_global=RopeConfig(theta=1_000_000.0),
        rope_local=RopeConfig(theta=10_000.0),
        bos_token_id=2,
        eos_token_ids=[1, 106] if instruct else [1],  # <eos>, and <end_of_turn> for the instruct models
        pad_token_id=0,
    )


for _key, _repo, _shape, _instruct, _what in (
    ("gemma-3-270m", "google/gemma-3-270m", (640, 18, 2048), False, "Gemma 3 270M base"),
    ("gemma-3-270m-it", "google/gemma-3-270m-it", (640, 18, 2048), True, "Gemma 3 270M instruct"),
    ("gemma-3-1b-it", "google/gemma-3-1b-it", (1152, 26, 6912), True, "Gemma 3 1B instruct"),
):
    register_model(
        _key,
        family="gemma3",
        config=_gemma3(*_shape, instruct=_instruct),
        hub_repo=_repo,
        license="gemma",
        gated=True,
        description=f"{_what} text decoder (sliding-window + global attention, 262k vocabulary)",
    )

register_model(
    "test-gemma3",
    family="gemma3",
    config=Gemma3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=16,
        query_pre_attn_scalar=32,
        rope_global=RopeConfig(theta=1_000_000.0),
        rope_local=RopeConfig(theta=10_000.0),
        bos_token_id=2,
        eos_token_ids=[1, 5],
        pad_token_id=0,
    ),
    license="apache-2.0",
    description="tiny random-init Gemma-3 (window 16, Gemma-turn tokenizer shipped with tinyvlm) for tests and demos",
)
