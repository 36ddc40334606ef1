"""The contract every language decoder family implements (see ../shared/API.md, "Decoder")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from torch import Tensor, nn

if TYPE_CHECKING:
    from tinyvlm.config import Config


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

    config: "Config"

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def generate(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Prompt plus new tokens ``[B, T + n]`` (see API.md). ``inputs_embeds`` replaces the prompt's
        embedding lookup (a VLM passes its merged image + text embeddings)."""
        raise NotImplementedError

    def generate_stream(
        self,
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
        """Same arguments as `generate`; yields the ``[B]`` tokens of each step as they are chosen
        (rows that have ended get the pad id)."""
        raise NotImplementedError
