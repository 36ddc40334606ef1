"""Language decoders: each family module registers its zoo entries (see `tinyvlm.registry`)."""

from tinyvlm.decoders.base import Decoder, DecoderOutput

__all__ = ["Decoder", "DecoderOutput"]
