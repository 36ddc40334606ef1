"""tinyvlm: small vision-language models in plain PyTorch.

``import tinyvlm`` is cheap: the registry and errors are torch-free, and everything that needs torch is
imported on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.errors import ConfigError, DataError, HubError, TinyVLMError, UnknownModelError, WeightsError
from tinyvlm.lazy import lazy_attributes
from tinyvlm.registry import ModelSpec, get_spec, list_models, register_family, register_model

__version__ = "0.1.0"

_LAZY = {
    "build_encoder": "tinyvlm.api",
    "build_decoder": "tinyvlm.api",
    "build_projector": "tinyvlm.api",
    "build_vlm": "tinyvlm.api",
    "load_vlm": "tinyvlm.api",
    "VLM": "tinyvlm.api",  # the class, with from_pretrained (= load_vlm) bound by tinyvlm.api
    "VLMConfig": "tinyvlm.vlm.config",
    "load_tokenizer": "tinyvlm.tokenizer",
    "Tokenizer": "tinyvlm.tokenizer",
    "train": "tinyvlm.training.loop",
    "evaluate": "tinyvlm.evaluation.runner",
}

__all__ = [
    "__version__",
    "TinyVLMError",
    "UnknownModelError",
    "ConfigError",
    "WeightsError",
    "HubError",
    "DataError",
    "ModelSpec",
    "list_models",
    "get_spec",
    "register_family",
    "register_model",
    *_LAZY,
]


__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.evaluation.runner import evaluate
    from tinyvlm.api import build_decoder, build_encoder, build_projector
    from tinyvlm.tokenizer import Tokenizer, load_tokenizer
    from tinyvlm.training.loop import train
    from tinyvlm.api import build_vlm, load_vlm
    from tinyvlm.vlm.config import VLMConfig
    from tinyvlm.vlm.model import VLM
