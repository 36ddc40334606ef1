"""Generation, written once: the validated `SamplingConfig`, the token loop on a preallocated KV cache
(`generate_tokens`) and the text side of streaming (`IncrementalDetokenizer`, `StopStrings`, `TextStream`).

Tokens: the prompt is run once (only its last position goes through the LM head), then one token per step.
Each step's logits are processed in transformers' order: repetition penalty (on the fp32 logits), then,
when sampling, temperature, top-k and top-p. Rows that produced a stop id keep receiving the pad id;
generation ends when every row has ended.

Text: the ids of each row are decoded once, incrementally (a window of recent tokens, not the whole answer,
at every step), and cut before the first stop string.

This module needs only what `TokenModel` describes of a decoder, so `tinyvlm.decoders.base` can import it.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, ContextManager, Iterator, Protocol, Sequence

import torch
from pydantic import Field, field_validator
from torch import Tensor

from tinyvlm.config import Config
from tinyvlm.errors import ConfigError

TokenId = Annotated[int, Field(ge=0)]
#: What a decoder shows while the bytes of one character are split over several tokens.
REPLACEMENT_CHARACTER = "\ufffd"


class SamplingConfig(Config):
    """How the next token is chosen and when generation ends (the keyword arguments of ``Decoder.generate``,
    ``Decoder.generate_stream``, ``VLM.generate`` and ``VLM.stream``)."""

    #: Tokens generated at most (0: none).
    max_new_tokens: int = Field(64, ge=0)
    #: 0 is greedy (argmax); otherwise a sample from ``softmax(logits / temperature)``.
    temperature: float = Field(0.0, ge=0)
    #: Sample among the ``top_k`` most likely tokens only.
    top_k: int | None = Field(None, ge=1)
    #: Sample from the smallest set of tokens whose probabilities sum to at least ``top_p`` (nucleus).
    top_p: float | None = Field(None, gt=0, le=1)
    #: transformers' ``repetition_penalty``: every token id present in the prompt or already generated has
    #: its logit divided by it when positive, multiplied when negative (> 1 discourages repeating, < 1
    #: encourages it). Applied before temperature / top-k / top-p, to greedy decoding too.
    repetition_penalty: float | None = Field(None, gt=0)
    #: Seeds a `torch.Generator` of its own for sampling: the same seed gives the same sample, whatever the
    #: global RNG's state (which stays untouched). None draws from the global RNG.
    seed: int | None = Field(None, ge=0, lt=2**64)
    #: Ids that end a row: None the checkpoint's (``config.eos_token_ids``), ``[]`` never (always
    #: ``max_new_tokens``).
    eos_token_id: TokenId | list[TokenId] | None = None
    #: Strings that end an answer (text level: `tinyvlm.vlm.VLM` only): the answer stops before the first
    #: occurrence of any of them, which is not included (OpenAI's semantics).
    stop: list[str] = []

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not text for text in value):
            raise ValueError("stop strings must not be empty")
        return value


# ------------------------------------------------------------------------------------------------- tokens


class StopIds(Protocol):
    eos_token_ids: list[int]
    pad_token_id: int | None


class TokenModel(Protocol):
    """What generation needs of a decoder (`tinyvlm.decoders.base.TransformerDecoder` has it)."""

    @property
    def config(self) -> StopIds: ...

    def new_cache(self, batch_size: int, max_len: int) -> Any: ...

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor: ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    #: Entered around each step of the token loop, ``step_scope.step("prefill", tokens)`` and
    #: ``step_scope.step("decode")``; None runs the steps as they are. `tinyvlm.inference.prepare_for_inference`
    #: installs the model's thread choice here.
    step_scope: StepScope | None


class StepScope(Protocol):
    """A context around each step of the token loop (``workload``: ``"prefill"`` or ``"decode"``; ``units``:
    the step's size, its tokens)."""

    def step(self, workload: str, units: float = 1.0) -> ContextManager[Any]: ...


def step_context(model: TokenModel, workload: str, units: float = 1.0) -> ContextManager[Any]:
    """``model.step_scope.step(workload, units)``, or nothing when the model has no step scope."""
    scope = model.step_scope
    return contextlib.nullcontext() if scope is None else scope.step(workload, units)


def stop_ids(model: TokenModel, sampling: SamplingConfig) -> list[int]:
    """The ids that end a row: ``sampling.eos_token_id``, or the checkpoint's when it is None."""
    ids = sampling.eos_token_id
    if ids is None:
        return list(model.config.eos_token_ids)
    return [ids] if isinstance(ids, int) else list(ids)


def generate_tokens(
    model: TokenModel,
    input_ids: Tensor,
    sampling: SamplingConfig,
    *,
    attention_mask: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the ``[B]`` new tokens of each step (rows that have ended get the pad id).

    ``attention_mask``: ``[B, T]`` with 0 on left padding. ``inputs_embeds``: ``[B, T, D]`` used instead of
    embedding ``input_ids`` (a VLM's merged image + text embeddings); ``input_ids`` still give the prompt's
    length and the ids the repetition penalty counts. ``sampling.stop`` is text level and ignored here.
    The arguments are checked when this is called, not when the first token is asked for.
    """
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != (B, T):
        raise ConfigError(f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {(B, T)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ConfigError(f"attention_mask must be [batch, length] = {(B, T)}; got {tuple(attention_mask.shape)}")
    return _token_steps(model, input_ids, sampling, attention_mask, inputs_embeds)


def _token_steps(
    model: TokenModel,
    input_ids: Tensor,
    sampling: SamplingConfig,
    attention_mask: Tensor | None,
    inputs_embeds: Tensor | None,
) -> Iterator[Tensor]:
    stops = stop_ids(model, sampling)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (stops[0] if stops else 0)
    B, T = input_ids.shape
    new = sampling.max_new_tokens
    device = input_ids.device
    if new == 0:
        return
    cache = model.new_cache(B, T + new)
    mask = None  # positions follow from it: cumsum - 1 (see TransformerDecoder.hidden_states)
    if attention_mask is not None:
        mask = torch.ones(B, T + new, dtype=torch.bool, device=device)
        mask[:, :T] = attention_mask.bool()
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    generator = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)
    seen: Tensor | None = None  # [B, V]: ids present so far (repetition penalty)

    # inference mode (and the step's scope: its thread count, see tinyvlm.inference.threads) is entered per step,
    # not around the yields (a generator would leak it into the caller)
    with step_context(model, "prefill", B * T), torch.inference_mode():
        hidden = model.hidden_states(
            None if inputs_embeds is not None else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=None if mask is None else mask[:, :T],
            cache=cache,
        )
        logits = model.logits(hidden[:, -1]).float()
        if sampling.repetition_penalty is not None:
            seen = present_ids(input_ids, attention_mask, logits.shape[-1])
        token = _choose(logits, sampling, seen, generator)
    for step in range(new):
        token = torch.where(ended, pad, token)
        yield token
        if stops:
            ended |= torch.isin(token, stop_tensor)
            if bool(ended.all()):
                return
        if step == new - 1:
            return
        with step_context(model, "decode"), torch.inference_mode():
            if seen is not None:
                seen[torch.arange(B, device=device), token] = True
            hidden = model.hidden_states(
                token[:, None], attention_mask=None if mask is None else mask[:, : T + step + 1], cache=cache
            )
            token = _choose(model.logits(hidden[:, -1]).float(), sampling, seen, generator)


def _choose(logits: Tensor, sampling: SamplingConfig, seen: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Next token per row from fp32 ``logits [B, V]``: the repetition penalty on the ids marked in ``seen``
    (None exactly when there is no penalty), then argmax when ``temperature == 0``, else a sample (drawn
    with ``generator``) from ``softmax(logits / temperature)`` restricted to the ``top_k`` best and to the
    nucleus of mass ``top_p`` (transformers' order)."""
    if seen is not None:
        logits = penalize_repetitions(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def present_ids(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> Tensor:
    """``[B, vocab_size]`` booleans: the ids of each row's prompt, padding excluded (as transformers'
    ``prompt_ignore_length``) and ids beyond the head's vocabulary dropped (a VLM's image placeholder)."""
    ids = input_ids.clamp(min=0, max=vocab_size)
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, vocab_size)
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size].contiguous()


def penalize_repetitions(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: the logits of ``seen`` ids divided by ``penalty``
    when positive, multiplied when negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


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


# --------------------------------------------------------------------------------------------------- text


class TextTokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class IncrementalDetokenizer:
    """The text of a growing list of ids, piece by piece, decoding only a few recent tokens per step (the
    prefix-offset / read-offset technique of TGI and vLLM), so a whole answer costs O(n), not O(n^2).

    ``ids[prefix_offset:read_offset]`` are the tokens whose text was returned last; decoding them with the
    new tokens after them and dropping their own text leaves the new text, with the spacing a decoder gives
    a token after its neighbours. A piece is held back while it ends in U+FFFD (inside a multi-byte
    character split across tokens) and while a run of byte-fallback tokens (``<0xNN>``, SentencePiece
    vocabularies) is open: such a decoder turns a whole run into U+FFFD when any byte of it is invalid, so
    the run's text is known only once it has ended. Joined, the pieces and `finish` equal
    ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.in_byte_run = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        shown = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        return text[len(shown) :] if len(text) > len(shown) else ""

    def push(self, token_id: int) -> str:
        """Add one id; the text it completes ("" while it is held back)."""
        self.ids.append(token_id)
        if is_byte_token(self.tokenizer.id_to_token(token_id)):
            self.in_byte_run = True
            return ""
        if self.in_byte_run and self._decode([token_id]) == "":
            return ""  # a skipped special token: the decoder sees the bytes around it as one run
        self.in_byte_run = False
        piece = self._new_text()
        if not piece or piece.endswith(REPLACEMENT_CHARACTER):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return piece

    def finish(self) -> str:
        """The text held back, as a full decode shows it (an unfinished character as U+FFFD)."""
        piece = self._new_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        self.in_byte_run = False
        return piece


def is_byte_token(token: str | None) -> bool:
    """A byte-fallback token ``<0xNN>``, as the ``ByteFallback`` decoder of `tokenizers` recognises them."""
    if token is None or len(token) != 6 or not token.startswith("<0x") or not token.endswith(">"):
        return False
    try:
        int(token[3:5], 16)
    except ValueError:
        return False
    return True


class StopStrings:
    """Text cut before the first occurrence of any stop string. Text that might be the start of a stop
    string is held back until it is known not to be; `found` tells that one appeared."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = list(stop)
        self.held = ""
        self.found = False

    def push(self, text: str) -> str:
        """The part of ``text`` (after what was held) that is certainly answer text."""
        if self.found:
            return ""
        if not self.stop:
            return text
        held = self.held + text
        hits = [at for at in (held.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.found, self.held = True, ""
            return held[: min(hits)]
        keep = self._possible_start(held)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def _possible_start(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string (0 when none does)."""
        longest = min(len(text), max(len(s) for s in self.stop) - 1)
        for length in range(longest, 0, -1):
            if any(s.startswith(text[-length:]) for s in self.stop):
                return length
        return 0

    def finish(self) -> str:
        """What was held back: the answer ended without completing a stop string."""
        held, self.held = self.held, ""
        return held


class TextStream:
    """One answer's text: ids -> incremental text -> cut at stop strings. ``done`` once it has ended (a
    stop string appeared, or `finish` was called)."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(stop)
        self.done = False

    def push(self, token_id: int) -> str:
        piece = self.stops.push(self.detokenizer.push(token_id))
        self.done = self.stops.found
        return piece

    def finish(self) -> str:
        """The rest of the answer (held-back text), ending it."""
        if self.done:
            return ""
        self.done = True
        piece = self.stops.push(self.detokenizer.finish())
        return piece + self.stops.finish()
