"""QLoRA: peft LoRA layers around quantized base linears (weight-only int8 / int4 layers, which are not
``nn.Linear``). Imported only when a target layer is such a module; it imports peft.

peft adapts ``nn.Linear`` (and bitsandbytes' layers) itself; any other layer type needs a LoRA class
registered for it (``LoraConfig._register_custom_module``). `QuantLoraLinear` is peft's own ``lora.Linear``:
its forward, ``base_layer(x) + scale * B(A(dropout(x)))``, never reads the base weight, so it runs unchanged
on a quantized base. A and B stay in floating point: the adapter trains in full precision, the base stays
quantized and frozen. What it cannot do is fold ``B A`` into integer weights: an adapter trained on a quantized
base is merged into the full-precision base (``tinyvlm merge`` loads it unquantized).

A base layer qualifies when it has integer ``in_features`` and ``out_features`` and computes ``x W^T (+ b)``
(`tinyvlm.interop.lora.is_linear`; `tinyvlm.interop.lora.register_quantized_layers` registers this class for
it). Training needs every quantized layer on the backward path (adapted or not, the LM head included) to pass
gradients to its input, ``dx = dy W``, although its quantized kernel has no derivative: tinyvlm's own
(`tinyvlm.inference.quantize`, ``load_vlm(..., quantize=)``, ``tinyvlm train --lora R --quantize int8``) do it with
`tinyvlm.inference.quantize.FrozenProduct`.
"""

from __future__ import annotations

import warnings
from typing import Any

from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from tinyvlm.errors import ConfigError


class QuantLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a quantized base layer (no merging: see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # peft warns about any layer type it does not know; this one is handled
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ConfigError(
            f"cannot fold a LoRA adapter into the quantized {type(self.get_base_layer()).__name__} weights: merge it "
            "into the full-precision base instead (tinyvlm merge BASE ADAPTER DIR loads the base unquantized)"
        )
