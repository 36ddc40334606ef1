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

#: Version of the config.json layout written by `VLM.save_pretrained`.
SCHEMA_VERSION = 1
MODEL_TYPE = "tinyvlm"
#: SmolVLM's token around each image view (``smolvlm`` layout).
SMOLVLM_WRAP_TOKEN = "<fake_token_around_image>"


class ImageTokenConfig(Config):
    """The special tokens that carry images, and the image-splitting settings."""

    family: ClassVar[str] = "image-tokens"

    #: One per projected image feature.
    image_token: str = "<|image|>"
    #: Before the global view of a split image.
    global_image_token: str = "<|global_image|>"
    #: Before each tile of a split image; ``{row}`` and ``{col}`` count from 1.
    tile_token: str = "<row_{row}_col_{col}>"
    #: Split images larger than the encoder's input into a grid of tiles (plus a global view).
    split_images: bool = False
    #: At most this many tile rows and columns (nanoVLM: 4, i.e. 16 tiles + the global view).
    max_grid: int = Field(4, ge=1, le=8)
    layout: Literal["nanovlm", "smolvlm"] = "nanovlm"
    #: ``smolvlm`` layout: first resize so the longest edge has this many pixels (None: keep the size).
    resize_longest_edge: int | None = Field(None, ge=1)
    #: Views resized bilinearly and rescaled to [0, 1] without the encoder's mean / std (nanoVLM v0.1's
    #: ``Resize`` + ``ToTensor``) instead of the encoder's own preprocessing.
    rescale_only: bool = False

    @model_validator(mode="after")
    def _smolvlm_strings(self) -> "ImageTokenConfig":
        fixed = {"image_token": "<image>", "global_image_token": "<global-img>", "tile_token": "<row_{row}_col_{col}>"}
        wrong = {name: getattr(self, name) for name, value in fixed.items() if getattr(self, name) != value}
        if self.layout == "smolvlm" and wrong:
            raise ValueError(
                f"the smolvlm layout writes SmolVLM's token strings ({', '.join(fixed.values())}); got "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}: pass "
                + ", ".join(f"{k}={fixed[k]!r}" for k in wrong)
            )
        return self

    def marker_tokens(self) -> list[str]:
        """The tokens that are embedded like text (and so need embedding rows): global and tile markers."""
        tiles = [self.tile(r, c) for r in range(1, self.max_grid + 1) for c in range(1, self.max_grid + 1)]
        if self.layout == "smolvlm":
            return [SMOLVLM_WRAP_TOKEN, self.global_image_token, *(tiles if self.split_images else [])]
        if not self.split_images:
            return []
        return [self.global_image_token, *tiles]

    def tile(self, row: int, col: int) -> str:
        return self.tile_token.format(row=row, col=col)


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

    Edit a recipe with ``replace`` and pass it to `build_vlm`::

        config = tinyvlm.get_spec("dinov3-gemma3-270m").config
        vlm = tinyvlm.build_vlm(config.replace(projector="pixel-shuffle-mlp"))
    """

    family: ClassVar[str] = "vlm"

    model_type: Literal["tinyvlm"] = MODEL_TYPE
    schema_version: int = SCHEMA_VERSION
    encoder: str
    decoder: str
    projector: str = "pixel-shuffle-mlp"
    encoder_kwargs: dict[str, Any] = {}
    decoder_kwargs: dict[str, Any] = {}
    projector_kwargs: dict[str, Any] = {}
    image_tokens: ImageTokenConfig = ImageTokenConfig()
    training: TrainingDefaults = TrainingDefaults()
    parts: BuiltParts | None = None
    #: How the decoder's weights are stored (None: as the checkpoint, floating point); `tinyvlm.load_vlm`
    #: builds the quantized modules it names before loading ``model.safetensors`` strictly.
    quantization: QuantizationConfig | None = None

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
