"""Autoregressive generation on a preallocated KV cache: greedy, temperature, top-k, top-p, several stop ids,
left-padded batches and streaming.

The prompt is run once (only its last position goes through the LM head), then one token per step.
Rows that produced a stop id keep receiving the pad id; generation ends when every row has ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from tinyvlm.errors import ConfigError

if TYPE_CHECKING:
    from tinyvlm.decoders.base import TransformerDecoder


def generate_stream(
    decoder: "TransformerDecoder",
    input_ids: Tensor,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the ``[B]`` new tokens of each step.

    ``eos_token_id``: an id or a list of ids that end a row; None means the checkpoint's
    (``config.eos_token_ids``), ``[]`` never stops early. ``attention_mask``: ``[B, T]`` with 0 on left
    padding. ``inputs_embeds``: ``[B, T, D]`` used instead of embedding ``input_ids`` (a VLM's merged
    image + text embeddings); ``input_ids`` still give the prompt's length and the returned prefix.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
    stops = decoder.config.eos_token_ids if eos_token_id is None else _as_list(eos_token_id)
    pad = decoder.config.pad_token_id if decoder.config.pad_token_id is not None else (stops[0] if stops else 0)
    B, T = input_ids.shape
    device = input_ids.device
    if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != (B, T):
        raise ConfigError(f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {(B, T)}")
    if max_new_tokens == 0:
        return

    cache = decoder.new_cache(B, T + max_new_tokens)
    mask = None  # positions follow from it: cumsum - 1 (see TransformerDecoder.hidden_states)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ConfigError(f"attention_mask must be [batch, length] = {(B, T)}; got {tuple(attention_mask.shape)}")
        mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        mask[:, :T] = attention_mask.bool()
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)

    # inference mode is entered per step, not around the yields (a generator would leak it into the caller)
    with torch.inference_mode():
        hidden = decoder.hidden_states(
            None if inputs_embeds is not None else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=None if mask is None else mask[:, :T],
            cache=cache,
        )
        token = _choose(decoder.logits(hidden[:, -1]), temperature, top_k, top_p)
    for step in range(max_new_tokens):
        token = torch.where(ended, pad, token)
        yield token
        if stops:
            ended |= torch.isin(token, stop_ids)
            if bool(ended.all()):
                return
        if step == max_new_tokens - 1:
            return
        L = T + step
        with torch.inference_mode():
            hidden = decoder.hidden_states(
                token[:, None],
                attention_mask=None if mask is None else mask[:, : L + 1],
                cache=cache,
            )
            token = _choose(decoder.logits(hidden[:, -1]), temperature, top_k, top_p)


def _choose(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Next token per row from ``logits [B, V]``: argmax when ``temperature == 0``, else a sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` best and to the smallest set with
    probability mass ``top_p`` (applied in that order, as transformers does)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus of mass ``top_p``
    (the most likely token always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 or None; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None; got {top_p}")


def _as_list(ids: int | list[int]) -> list[int]:
    return [ids] if isinstance(ids, int) else list(ids)
