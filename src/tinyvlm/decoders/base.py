"""The contract every language decoder family implements (see ../shared/API.md, "Decoder")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from pydantic import Field, field_validator, model_validator

from tinyvlm.config import Config, check_activation
from tinyvlm.decoders.cache import KVCache
from tinyvlm.errors import ConfigError
from tinyvlm.generation import SamplingConfig, StepScope, generate_tokens
from tinyvlm.layers import Embedding, grown
from tinyvlm.registry import get_writer


@dataclass
class DecoderOutput:
    logits: Tensor  # [B, T, V]
    cache: Any  # the KV cache to pass back for incremental decoding (None when none was requested)


class Decoder(nn.Module):
    """A causal language model.

    ``decoder(input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None)``
    returns a `DecoderOutput`. ``embed(input_ids)`` gives the input embeddings exactly as the family
    computes them (Gemma scales by sqrt(hidden)); a VLM replaces image positions of that tensor and passes it
    as ``inputs_embeds``.
    """

    config: Config

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int) -> "KVCache":
        """An empty preallocated KV cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + new)."""
        raise NotImplementedError

    #: Entered around each generation step (`tinyvlm.generation.TokenModel.step_scope`); None: nothing.
    #: `tinyvlm.inference.prepare_for_inference` installs the thread choice here.
    step_scope: StepScope | None = None

    def generate(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Prompt plus new tokens ``[B, T + n]`` (see API.md; the options are `SamplingConfig`'s).
        ``attention_mask``: ``[B, T]``, 0 on left padding; ``inputs_embeds`` replaces the prompt's embedding
        lookup (a VLM passes its merged image + text embeddings). Never changes the weights."""
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
        )  # fmt: skip
        steps = list(generate_tokens(self, input_ids, sampling, attention_mask=attention_mask, inputs_embeds=inputs_embeds))
        return torch.cat((input_ids, torch.stack(steps, dim=1)), dim=1) if steps else input_ids

    def generate_stream(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Same arguments as `generate`; yields the ``[B]`` tokens of each step as they are chosen
        (rows that have ended get the pad id). Bad arguments raise here, before the first step."""
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
        )  # fmt: skip
        return generate_tokens(self, input_ids, sampling, attention_mask=attention_mask, inputs_embeds=inputs_embeds)


# ------------------------------------------------------------------------------ the shared transformer stack


class DecoderConfig(Config):
    """Fields every decoder family has, including what generation needs (special token ids).
    ``head_dim`` defaults to ``hidden_size / num_heads`` (computed once, here)."""

    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(None, ge=1, validate_default=False)  # type: ignore[assignment]
    rms_norm_eps: float = Field(gt=0)
    hidden_act: str
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = Field(ge=1)
    bos_token_id: int | None = Field(None, ge=0)
    #: Every id that ends a generation (Gemma-3-it: ``<eos>`` and ``<end_of_turn>``).
    eos_token_ids: list[int] = []
    pad_token_id: int | None = Field(None, ge=0)

    @field_validator("hidden_act")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        return check_activation(value)

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("head_dim") is None and "hidden_size" in values:
            heads, hidden = values.get("num_heads"), values["hidden_size"]
            if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
                if hidden % heads:
                    raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}: give head_dim")
                values = {**values, "head_dim": hidden // heads}
        return values

    @model_validator(mode="after")
    def _check_shapes(self) -> "DecoderConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        ids = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
        ids += [("eos_token_ids", i) for i in self.eos_token_ids]
        for name, token in ids:
            if token is not None and not 0 <= token < self.vocab_size:
                raise ValueError(f"{name} {token} is outside the vocabulary of {self.vocab_size} tokens")
        return self

    def with_generation_config(self, generation: dict[str, Any]) -> "DecoderConfig":
        """These ids overridden by those a ``generation_config.json`` sets (it takes precedence over
        config.json in transformers too)."""
        updates: dict[str, Any] = {}
        if generation.get("eos_token_id") is not None:
            updates["eos_token_ids"] = hf_token_ids(generation["eos_token_id"])
        for name in ("bos_token_id", "pad_token_id"):
            if generation.get(name) is not None:
                updates[name] = generation[name]
        return self.replace(**updates) if updates else self


def hf_token_ids(value: int | list[int] | None) -> list[int]:
    """``eos_token_id`` of a config.json (an int, a list or null) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def hf_token_value(ids: list[int]) -> int | list[int] | None:
    """The inverse of `hf_token_ids`: one id as an int, several as a list, none as null."""
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


class TransformerDecoder(Decoder):
    """A pre-norm decoder-only transformer with HF-compatible module names; families supply the blocks.

    A family's ``__init__`` sets ``embed_tokens``, ``layers`` (blocks called as
    ``block(h, rope, mask, layer_cache)``, each with ``self_attn.window`` and a ``rope_name``), ``norm``,
    ``rotary`` (a ``ModuleDict`` of `RotaryEmbedding` by ``rope_name``) and ``lm_head`` (None when tied).
    """

    config: DecoderConfig
    #: The token embedding (`tinyvlm.layers.Embedding`, or a quantized table with the same methods), which is
    #: also the LM head when ``lm_head`` is None.
    embed_tokens: Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.ModuleDict
    lm_head: nn.Linear | None
    #: ``tanh`` soft cap of the logits (Gemma-2 style); None for none.
    final_logit_softcap: float | None = None

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype the decoder computes in (its norms'; quantized matrices store ints)."""
        return self.norm.weight.dtype

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init as the reference's ``initializer_range``: linear and embedding weights N(0, std),
        biases 0, the padding embedding 0, norms as constructed. (PyTorch's default N(0, 1) embedding, tied to the head, would start
        training from logits in the hundreds.) Families call it at the end of ``__init__``; a checkpoint
        load replaces every tensor anyway."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                if getattr(module, "padding_idx", None) is not None:
                    module.weight[module.padding_idx].zero_()

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids).to(self.dtype)  # a quantized table gives float32 rows

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(
            [layer.self_attn.window for layer in self.layers],
            batch_size=batch_size,
            max_len=max_len,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=self.dtype,
            device=self.embed_tokens.weight.device,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        hidden = self.hidden_states(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        return DecoderOutput(self.logits(hidden), cache)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head over final hidden states (the unscaled embedding matrix when tied)."""
        logits = self.embed_tokens.as_head(hidden) if self.lm_head is None else self.lm_head(hidden)
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states ``[B, T, D]`` (the forward without the LM head); same arguments as forward.

        ``attention_mask``: a ``[B, past + T]`` padding mask (1 token, 0 pad) or a boolean ``[B, 1, T, past + T]``
        mask of allowed keys, ANDed with the causal / sliding-window rule. Without ``position_ids``,
        positions are ``cumsum(mask) - 1`` under a 2-D mask (left padding) and ``past .. past + T - 1`` otherwise.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        past = 0
        if cache is not None:
            cache.check_room(T)
            past = cache.length
        padding, allowed = _split_mask(attention_mask, B, T, past + T)
        if position_ids is not None:
            ropes = {name: rotary(position_ids, h.dtype) for name, rotary in self.rotary.items()}
        else:  # positions below past + T: read from the rotary tables
            if padding is not None:
                position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device)[None].expand(B, T)
            ropes = {name: rotary.lookup(position_ids, past + T, h.dtype) for name, rotary in self.rotary.items()}
        query_index = torch.arange(past, past + T, device=h.device)
        masks: dict[int | None, Tensor | None] = {}
        for i, layer in enumerate(self.layers):
            window = layer.self_attn.window
            if window not in masks:
                if cache is None:
                    key_index = torch.arange(T, device=h.device)
                else:
                    key_index = cache.key_index(cache.layers[i].capacity, T, h.device)
                masks[window] = attention_mask_for(query_index, key_index, window, padding, allowed)
            h = layer(h, ropes[layer.rope_name], masks[window], None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def save_pretrained(self, folder: str | Path, layout: str = "transformers", tokenizer: Any = None, *,
                        overwrite: bool = False) -> Path:
        """Write the decoder in a file ``layout`` (`tinyvlm.registry.get_writer`): ``"transformers"``, a
        transformers causal-LM folder (its family's ``LlamaForCausalLM`` / ``Gemma3ForCausalLM``, with the
        ``tokenizer`` when given), atomically. tinyvlm reads decoders in that layout. ``overwrite`` replaces a
        saved model in ``folder``."""
        return get_writer(layout, "decoder")(self, Path(folder), tokenizer=tokenizer, overwrite=overwrite)

    @torch.no_grad()
    def resize_vocab(self, new_size: int) -> None:
        """Grow the vocabulary to ``new_size`` (added special tokens, e.g. image tokens). New embedding (and
        untied head) rows are the mean of the existing rows; a tied head stays tied."""
        old = self.vocab_size
        if new_size < old:
            raise ConfigError(f"resize_vocab only grows the vocabulary ({old} -> {new_size} would drop tokens)")
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            raise ConfigError(f"resize_vocab of a decoder whose untied head is a {type(self.lm_head).__name__}: "
                              "resize before quantizing it")
        self.embed_tokens.grow_to(new_size)
        if self.lm_head is not None:
            self.lm_head.weight = nn.Parameter(grown(self.lm_head.weight, new_size))
            self.lm_head.out_features = new_size
        self.config = self.config.replace(vocab_size=new_size)


def _split_mask(mask: Tensor | None, batch: int, new: int, total: int) -> tuple[Tensor | None, Tensor | None]:
    """A 2-D padding mask (as bool) or a 4-D allowed-keys mask, validated against the expected shapes."""
    if mask is None:
        return None, None
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, total):
            raise ConfigError(
                f"2-D attention_mask has shape {tuple(mask.shape)}; expected [batch, past + new tokens] = "
                f"[{batch}, {total}]: it must cover the cached tokens too"
            )
        return mask.bool(), None
    if mask.dim() == 4:
        if mask.dtype != torch.bool or mask.shape[0] != batch or tuple(mask.shape[1:]) != (1, new, total):
            raise ConfigError(
                f"4-D attention_mask must be boolean [{batch}, 1, {new}, {total}] (True = may attend); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return None, mask
    raise ConfigError(f"attention_mask must be 2-D [B, S] or 4-D [B, 1, T, S]; got {mask.dim()}-D")


def attention_mask_for(
    query_index: Tensor, key_index: Tensor, window: int | None, padding: Tensor | None, allowed: Tensor | None
) -> Tensor | None:
    """Boolean ``[B|1, 1, T, S]`` mask of the keys (token indices ``key_index``, -1 = empty slot) each query
    (token indices ``query_index``) may attend to: causal, within ``window`` (``q - k < window``), not padding,
    and allowed by a 4-D mask. None when every key is allowed (one new token, no padding: the cache then
    only returns keys it may see).

    Every query also sees itself, so that the rows of padding queries are never empty (an empty row would
    make NaNs that leak through the values of the next layer); real tokens are unaffected.
    """
    if len(query_index) == 1 and padding is None and allowed is None:
        return None
    q, k = query_index[:, None], key_index[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    mask = mask[None, None]
    safe = key_index.clamp(min=0)
    if padding is not None:
        mask = mask & padding[:, safe][:, None, None, :]
    if allowed is not None:
        mask = mask & allowed[..., safe]
    return mask | (k == q)
