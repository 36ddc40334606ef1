"""A VLM's configuration: which parts, how images become tokens, training defaults. Torch-free.

A `VLMConfig` without ``parts`` is a **recipe** (names of an encoder, a decoder and a projector, plus
overrides): `tinyvlm.build_vlm` resolves and builds it. `build_vlm`, and every checkpoint layout
`tinyvlm.load_vlm` reads, fill in ``parts`` (`BuiltParts`): each part's family, full config and Hub commit,
and the image-token ids of the tokenizer, so that a saved model rebuilds offline from ``config.json`` alone.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tinyvlm.config import Config, QuantizationConfig
from tinyvlm.processing.tokens import ImageTokenConfig

#: The default projector: nanoVLM's and SmolVLM's connector (a pixel shuffle and one bias-free Linear).
DEFAULT_PROJECTOR = "pixel-shuffle-linear"

#: Version of the config.json written by `VLM.save_pretrained` (2: ``image_tokens.token_layout``, which
#: version 1 called ``layout``).
SCHEMA_VERSION = 2
MODEL_TYPE = "tinyvlm"
class TrainingDefaults(Config):
    """Training settings a recipe suggests (nanoVLM's ``TrainConfig``); `tinyvlm.train` reads them as defaults.
    A learning rate of 0 freezes that part."""

    family: ClassVar[str] = "training-defaults"

    lr_projector: float = Field(5.12e-3, ge=0)
    lr_encoder: float = Field(5e-5, ge=0)
    lr_decoder: float = Field(5e-5, ge=0)
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(4096, ge=1)


class PartRecord(Config):
    """One built part: its family, the Hub commit its weights came from (None: random init or a local
    folder) and its full config, enough to rebuild it without the zoo or the network."""

    family: ClassVar[str] = "part"

    family_name: str
    revision: str | None = None
    config: dict[str, Any]


class BuiltParts(Config):
    """What `build_vlm` resolved: the three parts and the image-token ids of the saved tokenizer."""

    family: ClassVar[str] = "parts"

    encoder: PartRecord
    decoder: PartRecord
    projector: PartRecord
    image_token_id: int
    marker_token_ids: list[int] = []


class VLMConfig(Config):
    """A VLM: which encoder, decoder and projector (names and config overrides), the image-token settings and
    training defaults. ``parts`` is filled in by `build_vlm` with what it actually built; a recipe has none.

    A recipe's options are overridden where it is built::

        vlm = tinyvlm.build_vlm("dinov3-gemma3-270m", projector="pixel-shuffle-mlp")
    """

    family: ClassVar[str] = "vlm"

    model_type: Literal["tinyvlm"] = MODEL_TYPE
    schema_version: int = SCHEMA_VERSION
    encoder: str
    decoder: str
    projector: str = DEFAULT_PROJECTOR
    encoder_kwargs: dict[str, Any] = {}
    decoder_kwargs: dict[str, Any] = {}
    projector_kwargs: dict[str, Any] = {}
    image_tokens: ImageTokenConfig = ImageTokenConfig()
    training: TrainingDefaults = TrainingDefaults()
    parts: BuiltParts | None = None
    #: How the decoder's weights are stored (None: as the checkpoint, floating point); `tinyvlm.load_vlm`
    #: builds the quantized modules it names before loading ``model.safetensors`` strictly.
    quantization: QuantizationConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_schema_1(cls, values: Any) -> Any:
        """A version-1 ``config.json`` named ``image_tokens.token_layout`` ``layout``."""
        if isinstance(values, dict) and values.get("schema_version") == 1:
            tokens = dict(values.get("image_tokens") or {})
            if "layout" in tokens:
                tokens["token_layout"] = tokens.pop("layout")
            values = {**values, "image_tokens": tokens, "schema_version": SCHEMA_VERSION}
        return values

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int) -> int:
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"written by a newer tinyvlm (schema {version}; this one reads up to {SCHEMA_VERSION}): "
                "upgrade tinyvlm (pip install -U tinyvlm)"
            )
        return version

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "VLMConfig":
        """A saved VLM's ``config.json`` is the config itself."""
        return cls.validate_dict(hf_config, context="VLM config.json")  # type: ignore[return-value]
