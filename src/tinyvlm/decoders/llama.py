"""Llama family (SmolLM2, Llama-3.2): pre-norm blocks, grouped-query attention with RoPE (default or llama3
scaling), SiLU-gated MLP, RMSNorm that casts before scaling, tied or untied head. Matches transformers'
``LlamaForCausalLM``; reads its checkpoints (``model.`` prefix, no ``lm_head.weight`` when tied)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tinyvlm.config import require
from tinyvlm.decoders.base import DecoderConfig, TransformerDecoder, hf_token_ids, hf_token_value
from tinyvlm.decoders.cache import LayerKV
from tinyvlm.layers import Attention, Embedding, GatedMLP, RMSNorm, RopeConfig, RotaryEmbedding
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.weights import KeyMap


class LlamaConfig(DecoderConfig):
    family = "llama"

    rope: RopeConfig
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        require(hf, "pretraining_tp", 1, family="llama")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope=RopeConfig.from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"), theta=hf.get("rope_theta")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=hf_token_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` of transformers' ``LlamaForCausalLM`` for this config (`from_hf` reads it back)."""
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": self.rope.to_hf(),
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": hf_token_value(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }


class LlamaBlock(nn.Module):
    """``h = h + attn(norm(h)); h = h + mlp(norm(h))``."""

    rope_name = "default"

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, scale=c.head_dim**-0.5, bias=c.attention_bias
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, bias=c.mlp_bias)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: LayerKV | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(TransformerDecoder):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = nn.ModuleDict({"default": RotaryEmbedding(config.head_dim, config.rope)})
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()


def key_map(config: LlamaConfig) -> KeyMap:
    """Hub files: ``model.*`` plus ``lm_head.weight`` when untied (a tied file that stores it anyway holds
    a copy of the embedding, which is not read)."""
    if config.tie_word_embeddings:
        return KeyMap(rename=((r"model\.(.*)", r"\1"),), unused=(r"lm_head\.weight",))
    return KeyMap(rename=((r"model\.(.*)", r"\1"), (r"lm_head\.weight", "lm_head.weight")))


register_family(Family("llama", "decoder", LlamaConfig, Llama, key_map, hf_model_types=("llama",)))


# --------------------------------------------------------------------------------------------------- zoo


def _smollm2(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, instruct: bool) -> LlamaConfig:
    """SmolLM2 configs (HuggingFaceTB/SmolLM2-*/config.json). Base models: bos = eos = <|endoftext|> (0);
    instruct models: bos <|im_start|> (1), eos = pad = <|im_end|> (2)."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope=RopeConfig(theta=130000.0 if hidden == 2048 else 100000.0),
        bos_token_id=1 if instruct else 0,
        eos_token_ids=[2] if instruct else [0],
        pad_token_id=2 if instruct else None,
    )


_SMOLLM2 = {"135m": (576, 30, 9, 3, 1536), "360m": (960, 32, 15, 5, 2560), "1.7b": (2048, 24, 32, 32, 8192)}
for _size, _shape in _SMOLLM2.items():
    for _instruct in (False, True):
        _name = f"SmolLM2-{_size.upper()}{'-Instruct' if _instruct else ''}"
        register_model(
            f"smollm2-{_size}{'-instruct' if _instruct else ''}",
            family="llama",
            config=_smollm2(*_shape, instruct=_instruct),
            hub_repo=f"HuggingFaceTB/{_name}",
            license="apache-2.0",
            description=f"SmolLM2 {_size.upper()} {'instruct (ChatML)' if _instruct else 'base'} language model",
        )


def _llama32(hidden: int, layers: int, heads: int, intermediate: int, instruct: bool) -> LlamaConfig:
    """Llama-3.2 configs (meta-llama/Llama-3.2-*/config.json): llama3 RoPE scaling, tied head."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope=RopeConfig(
            theta=500000.0,
            type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        bos_token_id=128000,
        eos_token_ids=[128001, 128008, 128009] if instruct else [128001],
        pad_token_id=None,
    )


for _size, _shape in {"1b": (2048, 16, 32, 8192), "3b": (3072, 28, 24, 8192)}.items():
    for _instruct in (False, True):
        register_model(
            f"llama-3.2-{_size}{'-instruct' if _instruct else ''}",
            family="llama",
            config=_llama32(*_shape, instruct=_instruct),
            hub_repo=f"meta-llama/Llama-3.2-{_size.upper()}{'-Instruct' if _instruct else ''}",
            license="llama3.2",
            gated=True,
            description=f"Llama 3.2 {_size.upper()} {'instruct' if _instruct else 'base'} language model",
        )

register_model(
    "test-llama",
    family="llama",
    config=LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope=RopeConfig(theta=100000.0),
        bos_token_id=1,
        eos_token_ids=[2],
        pad_token_id=2,
    ),
    license="apache-2.0",
    description="tiny random-init Llama (SmolLM2-style, ChatML tokenizer shipped with tinyvlm) for tests and demos",
)
