"""The exceptions tinyvlm raises. Each message says what went wrong and what to do next."""

from __future__ import annotations


class TinyVLMError(Exception):
    """Base class of every error raised by tinyvlm."""


class UnknownModelError(TinyVLMError, KeyError):
    """A name that is not a zoo key (the message suggests the closest keys)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(TinyVLMError, ValueError):
    """An invalid configuration or override, or a checkpoint config tinyvlm cannot reproduce exactly."""


class WeightsError(TinyVLMError):
    """A checkpoint whose tensors do not match the model: missing, unexpected or mis-shaped keys."""


class HubError(TinyVLMError):
    """A download that failed: not found, gated, offline with nothing cached, or a network failure."""


class DataError(TinyVLMError, ValueError):
    """A bad training record; the message names the file and line."""
