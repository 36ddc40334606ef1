"""The contract every vision encoder family implements."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from PIL import Image

    from tinyvlm.config import Config


class Encoder(nn.Module):
    """A vision tower: ``encoder(pixel_values[B, 3, H, W]) -> [B, N, D]`` patch tokens after the final norm,
    prefix (CLS / register) tokens removed, equal to the reference's ``last_hidden_state[:, prefix:]``."""

    config: "Config"

    @property
    def dim(self) -> int:
        """Width ``D`` of the output tokens."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """The side of the square input the checkpoint was trained at (and `preprocess` resizes to)."""
        raise NotImplementedError

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of patch tokens for an input of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def preprocess(self, images: "Image.Image | list[Image.Image]") -> Tensor:
        """PIL image(s) of any mode and size -> ``pixel_values`` with the checkpoint's official transform."""
        raise NotImplementedError

    def forward(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError
