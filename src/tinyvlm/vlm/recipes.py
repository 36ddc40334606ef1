"""tinyvlm's own VLM family: the layout `VLM.save_pretrained` writes, and the recipes of the zoo.

A recipe is a `VLMConfig` without parts (an encoder, a decoder, a projector and their options); a folder
saved by tinyvlm has ``model_type: tinyvlm`` and the parts it was built from, and its tensors carry the
module's own names.
"""

from __future__ import annotations

from typing import Any

from tinyvlm.errors import ConfigError
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.sources import Source
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.processing.tokens import ImageTokenConfig
from tinyvlm.vlm.config import MODEL_TYPE, VLMConfig
from tinyvlm.vlm.model import VLM, assemble
from tinyvlm.weights import KeyMap


def read_config(hf: dict[str, Any], name: str) -> VLMConfig:
    """tinyvlm's own layout (`VLM.save_pretrained`): ``config.json`` is the `VLMConfig`, parts included."""
    config = VLMConfig.from_hf(hf)
    if config.parts is None:
        raise ConfigError(f"{name}: config.json is a recipe, not a saved model; build it with tinyvlm.build_vlm")
    return config


def read_tinyvlm(source: Source) -> tuple[VLMConfig, Tokenizer]:
    """tinyvlm's own layout: the config (`read_config`) and the tokenizer, whose image-token ids must be those
    the config records."""
    config = read_config(source.config_json(), source.name)
    assert config.parts is not None
    tokenizer = Tokenizer.from_folder(source.tokenizer_folder())
    tokens = config.image_tokens
    found = [tokenizer.token_to_id(t) for t in [*tokens.marker_tokens(), tokens.image_token]]
    expected = [*config.parts.marker_token_ids, config.parts.image_token_id]
    if found != expected:
        raise ConfigError(f"{source.name}: the tokenizer's image-token ids {found} differ from config.json's {expected}")
    return config, tokenizer


def key_map(config: VLMConfig) -> KeyMap:
    """The saved tensors have the module's names."""
    return KeyMap(rename=((r"(.+)", r"\1"),))


register_family(
    Family(
        name="vlm",
        kind="vlm",
        config_cls=VLMConfig,
        build=assemble,
        key_map=key_map,
        hf_model_types=(MODEL_TYPE,),
        read=read_tinyvlm,
        read_config=read_config,
    )
)


# ------------------------------------------------------------------------------------------------- zoo

register_model(
    "nanovlm-222m",
    family="vlm",
    config=VLMConfig(
        encoder="siglip-b16-224", decoder="smollm2-135m", projector="pixel-shuffle-linear", projector_kwargs={"factor": 2},
        image_tokens=ImageTokenConfig(token_layout="nanovlm"),
    ),
    license="apache-2.0",
    description="nanoVLM-222M recipe: SigLIP-B/16-224 + SmolLM2-135M, pixel shuffle 2 + Linear (49 tokens), "
    "nanoVLM's token layout (does not export to transformers)",
)
register_model(
    "nanovlm-460m",
    family="vlm",
    config=VLMConfig(
        encoder="siglip2-b16-512",
        decoder="smollm2-360m-instruct",
        projector="pixel-shuffle-linear",
        projector_kwargs={"factor": 4},
        image_tokens=ImageTokenConfig(token_layout="nanovlm", split_images=True, max_grid=4),
    ),
    license="apache-2.0",
    description="nanoVLM-460M recipe: SigLIP2-B/16-512 + SmolLM2-360M-Instruct, shuffle 4 + Linear, 4x4 tiles, "
    "nanoVLM's token layout (does not export to transformers)",
)
register_model(
    "dinov3-gemma3-270m",
    family="vlm",
    config=VLMConfig(
        encoder="dinov3-vits16plus", decoder="gemma-3-270m-it", projector="pixel-shuffle-linear", projector_kwargs={"factor": 2},
        image_tokens=ImageTokenConfig(token_layout="nanovlm"),
    ),
    license="dinov3-license + gemma",
    description="DINOv3 ViT-S/16+ + Gemma-3-270M-it, pixel shuffle 2 + Linear (the nanoVLM fork's preset; both parts gated)",
)
register_model(
    "test-vlm",
    family="vlm",
    config=VLMConfig(
        encoder="test-siglip", decoder="test-llama", projector="pixel-shuffle-linear", projector_kwargs={"factor": 2},
        image_tokens=ImageTokenConfig(token_layout="smolvlm"),
    ),
    license="apache-2.0",
    description="tiny random-init VLM for tests: test-siglip + test-llama, pixel shuffle 2 + Linear, SmolVLM's "
    "token layout (the defaults of a SigLIP + Llama pair: exports to transformers)",
)
