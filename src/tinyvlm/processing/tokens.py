"""How images become tokens: the special tokens that carry them, their layout and the image-splitting
settings (`ImageTokenConfig`, part of a `tinyvlm.vlm.VLMConfig`). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tinyvlm.config import Config
from tinyvlm.errors import ConfigError

#: SmolVLM's token around each image view (``smolvlm`` token layout).
SMOLVLM_WRAP_TOKEN = "<fake_token_around_image>"

TokenLayout = Literal["nanovlm", "smolvlm"]
#: Each token layout's own strings: the image token (one per projected feature) and the global-view marker.
LAYOUT_TOKENS: dict[str, tuple[str, str]] = {"nanovlm": ("<|image|>", "<|global_image|>"), "smolvlm": ("<image>", "<global-img>")}


def default_token_layout(encoder_family: str, decoder_family: str) -> TokenLayout:
    """The token layout of a pair when none is asked for: SmolVLM's where transformers runs the pair (its
    Idefics3 model: a SigLIP vision tower and a Llama-family text model; `tinyvlm.interop.transformers`),
    nanoVLM's otherwise."""
    return "smolvlm" if (encoder_family, decoder_family) == ("siglip", "llama") else "nanovlm"


class ImageTokenConfig(Config):
    """The special tokens that carry images, and the image-splitting settings. ``token_layout`` and the token
    strings may be left unset (None) in a recipe: `tinyvlm.build_vlm` settles them for the pair it builds
    (`resolved`); a built or saved model's are always set."""

    family: ClassVar[str] = "image-tokens"

    #: One per projected image feature; None: the token layout's (`LAYOUT_TOKENS`).
    image_token: str | None = None
    #: Before the global view of a split image; None: the token layout's.
    global_image_token: str | None = None
    #: Before each tile of a split image; ``{row}`` and ``{col}`` count from 1.
    tile_token: str = "<row_{row}_col_{col}>"
    #: Split images larger than the encoder's input into a grid of tiles (plus a global view).
    split_images: bool = False
    #: At most this many tile rows and columns (nanoVLM: 4, i.e. 16 tiles + the global view).
    max_grid: int = Field(4, ge=1, le=8)
    #: How image tokens are written: nanoVLM's ``<|image|>`` runs (the global view first) or SmolVLM's (tiles
    #: first, each view wrapped in ``<fake_token_around_image>``, which transformers' Idefics3Processor writes);
    #: see `tinyvlm.processing.processor`. None: the pair's default (`default_token_layout`).
    token_layout: TokenLayout | None = None
    #: ``smolvlm`` token layout: first resize so the longest edge has this many pixels (None: keep the size).
    resize_longest_edge: int | None = Field(None, ge=1)
    #: Views resized bilinearly and rescaled to [0, 1] without the encoder's mean / std (nanoVLM v0.1's
    #: ``Resize`` + ``ToTensor``) instead of the encoder's own preprocessing.
    rescale_only: bool = False

    @model_validator(mode="after")
    def _smolvlm_strings(self) -> "ImageTokenConfig":
        image, global_image = LAYOUT_TOKENS["smolvlm"]
        fixed = {"image_token": image, "global_image_token": global_image, "tile_token": "<row_{row}_col_{col}>"}
        wrong = {name: getattr(self, name) for name, value in fixed.items() if getattr(self, name) not in (value, None)}
        if self.token_layout == "smolvlm" and wrong:
            raise ValueError(
                f"the smolvlm token layout writes SmolVLM's token strings ({', '.join(fixed.values())}); got "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}: leave them out, or pass token_layout='nanovlm' "
                "to use strings of your own"
            )
        return self

    @property
    def is_resolved(self) -> bool:
        return self.token_layout is not None and self.image_token is not None and self.global_image_token is not None

    def resolved(self, layout_if_unset: TokenLayout) -> "ImageTokenConfig":
        """This config with its token layout settled (``layout_if_unset`` when it has none) and the token strings
        left unset taken from that layout."""
        layout = self.token_layout or layout_if_unset
        image, global_image = LAYOUT_TOKENS[layout]
        return self.replace(  # type: ignore[return-value]
            token_layout=layout, image_token=self.image_token or image,
            global_image_token=self.global_image_token or global_image,
        )

    def marker_tokens(self) -> list[str]:
        """The tokens that are embedded like text (and so need embedding rows): global and tile markers."""
        if not self.is_resolved:
            raise ConfigError("the image-token layout is not settled yet (a recipe's): tinyvlm.build_vlm settles it")
        tiles = [self.tile(r, c) for r in range(1, self.max_grid + 1) for c in range(1, self.max_grid + 1)]
        if self.token_layout == "smolvlm":
            return [SMOLVLM_WRAP_TOKEN, self.global_image_token, *(tiles if self.split_images else [])]
        if not self.split_images:
            return []
        return [self.global_image_token, *tiles]

    def tile(self, row: int, col: int) -> str:
        return self.tile_token.format(row=row, col=col)
