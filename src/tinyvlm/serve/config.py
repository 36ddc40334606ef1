"""The options of `tinyvlm serve`, validated before the model is loaded. Torch-free.

The field descriptions are the command line's help texts and the field names its flags (``max_batch`` is
``--max-batch``): `tinyvlm.cli` builds the ``serve`` parser from this class.
"""

from __future__ import annotations

from pydantic import Field

from tinyvlm.config import RuntimeOptions

MIB = 2**20


class ServeConfig(RuntimeOptions):
    """Where the server listens, how it batches, and the limits it answers with 429 / 413 / 400; how its
    model runs (`RuntimeOptions`: ``quantize``, ``threads``)."""

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    max_batch: int = Field(8, ge=1, description="requests answered together in one batch at most")
    max_queue: int = Field(64, ge=0, description="requests waiting for the model at most; more are answered 429")
    batch_wait_ms: float = Field(20.0, ge=0, description="a batch starts once no request has come for this many "
                                 "milliseconds (or max-batch are waiting)")
    max_images: int = Field(8, ge=0, description="images per request at most (more are answered 400)")
    max_image_bytes: int = Field(20 * MIB, ge=1, description="encoded bytes of one image at most (more: 413)")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image at most (more: 413)")
    image_fetch_timeout: float = Field(10.0, gt=0, description="seconds allowed to fetch one http(s) image URL")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: every image at its limit, base64-encoded, plus 1 MiB of text."""
        return self.max_images * (self.max_image_bytes * 4 // 3 + 4) + MIB
