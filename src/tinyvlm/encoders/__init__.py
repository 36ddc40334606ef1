"""Vision encoders: each family module registers its zoo entries (see `tinyvlm.registry`)."""

from tinyvlm.encoders.base import Encoder

__all__ = ["Encoder"]
