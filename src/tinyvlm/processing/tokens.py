"""How images become tokens: the special tokens that carry them, their layout and the image-splitting
settings (`ImageTokenConfig`, part of a `tinyvlm.vlm.VLMConfig`). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tinyvlm.config import Config

#: SmolVLM's token around each image view (``smolvlm`` token layout).
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
    #: How image tokens are written: nanoVLM's ``<|image|>`` runs (the global view first) or SmolVLM's (tiles
    #: first, each view wrapped in ``<fake_token_around_image>``); see `tinyvlm.processing.processor`.
    token_layout: Literal["nanovlm", "smolvlm"] = "nanovlm"
    #: ``smolvlm`` token layout: first resize so the longest edge has this many pixels (None: keep the size).
    resize_longest_edge: int | None = Field(None, ge=1)
    #: Views resized bilinearly and rescaled to [0, 1] without the encoder's mean / std (nanoVLM v0.1's
    #: ``Resize`` + ``ToTensor``) instead of the encoder's own preprocessing.
    rescale_only: bool = False

    @model_validator(mode="after")
    def _smolvlm_strings(self) -> "ImageTokenConfig":
        fixed = {"image_token": "<image>", "global_image_token": "<global-img>", "tile_token": "<row_{row}_col_{col}>"}
        wrong = {name: getattr(self, name) for name, value in fixed.items() if getattr(self, name) != value}
        if self.token_layout == "smolvlm" and wrong:
            raise ValueError(
                f"the smolvlm token layout writes SmolVLM's token strings ({', '.join(fixed.values())}); got "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}: pass "
                + ", ".join(f"{k}={fixed[k]!r}" for k in wrong)
            )
        return self

    def marker_tokens(self) -> list[str]:
        """The tokens that are embedded like text (and so need embedding rows): global and tile markers."""
        tiles = [self.tile(r, c) for r in range(1, self.max_grid + 1) for c in range(1, self.max_grid + 1)]
        if self.token_layout == "smolvlm":
            return [SMOLVLM_WRAP_TOKEN, self.global_image_token, *(tiles if self.split_images else [])]
        if not self.split_images:
            return []
        return [self.global_image_token, *tiles]

    def tile(self, row: int, col: int) -> str:
        return self.tile_token.format(row=row, col=col)
