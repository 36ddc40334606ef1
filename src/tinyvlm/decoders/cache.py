"""A preallocated key/value cache for incremental decoding.

Every layer owns fixed buffers ``[B, H_kv, capacity, head_dim]`` allocated once; decoding writes each new
key/value in place (no per-step concatenation). Global-attention layers keep every position
(``capacity = max_len``). Sliding-window layers keep only their window: a ring buffer of ``window`` slots
where token ``i`` lives in slot ``i % window``. The order of keys inside a ring does not matter to attention
(softmax over a set); the mask is built from each slot's token index (`KVCache.key_index`).

Token indices are positions in the (possibly left-padded) sequence, shared by all rows of the batch; they
are what the causal and sliding-window rules compare, as in transformers. RoPE positions are separate
(``position_ids``) and may differ per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyvlm.errors import ConfigError


class KVCache:
    """Keys and values of every layer of one batch. ``length``: tokens written so far (same for all rows)."""

    def __init__(
        self,
        windows: list[int | None],
        *,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.max_len = max_len
        self.length = 0
        self.layers = [
            LayerKV(self, min(window, max_len) if window else max_len, batch_size, num_kv_heads, head_dim, dtype, device)
            for window in windows
        ]

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise ConfigError(
                f"the KV cache holds {self.max_len} tokens and has {self.length}; {new_tokens} more do not fit. "
                "Create it with a larger max_len (decoder.new_cache(batch_size, max_len))."
            )

    def key_index(self, capacity: int, new_tokens: int, device: torch.device) -> Tensor:
        """Token index of every key a layer of this ``capacity`` attends to in the next forward (-1: empty)."""
        past, total = self.length, self.length + new_tokens
        if total <= capacity:  # nothing has wrapped: keys are tokens 0 .. total-1 in order
            return torch.arange(total, device=device)
        if new_tokens == 1:  # the new key is written first, then the whole ring is read
            return _ring_index(total, capacity, device)
        held = min(past, capacity)  # ring contents, then the new keys appended
        return torch.cat((_ring_index(past, capacity, device)[:held], torch.arange(past, total, device=device)))

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


def _ring_index(written: int, capacity: int, device: torch.device) -> Tensor:
    """Token held by each slot of a ring after ``written`` tokens: the latest ``i < written`` with ``i % capacity == slot``."""
    slots = torch.arange(capacity, device=device)
    return slots + capacity * torch.div(written - 1 - slots, capacity, rounding_mode="floor")


class LayerKV:
    """One layer's buffers (see `KVCache`)."""

    def __init__(
        self,
        parent: KVCache,
        capacity: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.parent = parent
        self.capacity = capacity
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new ``k, v [B, H_kv, T, d]``; return the keys/values to attend to, ordered as `KVCache.key_index`."""
        past, new = self.parent.length, k.shape[2]
        total = past + new
        if total <= self.capacity:
            self.k[:, :, past:total] = k
            self.v[:, :, past:total] = v
            return self.k[:, :, :total], self.v[:, :, :total]
        if new == 1:
            slot = past % self.capacity
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            return self.k, self.v
        held = min(past, self.capacity)
        keys = torch.cat((self.k[:, :, :held], k), dim=2)
        values = torch.cat((self.v[:, :, :held], v), dim=2)
        kept = min(new, self.capacity)  # a prompt longer than the window: only its last tokens stay
        slots = torch.arange(total - kept, total, device=k.device) % self.capacity
        self.k.index_copy_(2, slots, k[:, :, -kept:])
        self.v.index_copy_(2, slots, v[:, :, -kept:])
        return keys, values
