"""What makes inference fast, kept out of the model forwards (`tinyvlm.layers` and the families hold the
plain math):

* `tinyvlm.inference.prepare`: `prepare_for_inference` (decoding subclasses of the shared layers, weight
  layouts, fused products, the thread choice of generation) and `prepare_for_training`, its inverse for the
  layouts training reads;
* `tinyvlm.inference.products`: the fast products themselves, bit for bit the plain ones;
* `tinyvlm.inference.quantize`: weight-only int8 / int4 decoders on PyTorch's kernels;
* `tinyvlm.inference.threads`: intra-op thread counts, fixed around a block or tuned step by step.

Importing this package imports none of them; the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.lazy import lazy_attributes

_LAZY = {
    "prepare_for_inference": "tinyvlm.inference.prepare",
    "prepare_for_training": "tinyvlm.inference.prepare",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.inference.prepare import prepare_for_inference, prepare_for_training
