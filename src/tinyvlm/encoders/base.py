"""The contract every vision encoder family implements."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from PIL import Image

    from tinyvlm.config import Config
    from tinyvlm.processing.image import ImageTransform


class Encoder(nn.Module):
    """A vision tower: ``encoder(pixel_values[B, 3, H, W]) -> [B, N, D]`` patch tokens after the final norm,
    prefix (CLS / register) tokens removed, equal to the reference's ``last_hidden_state[:, prefix:]``."""

    #: The family config; every encoder config names its width, patch and training size ``hidden_size``,
    #: ``patch_size`` and ``image_size``.
    config: "Config"
    #: The checkpoint's official preprocessing (resize, rescale, normalise), set by the family.
    image_transform: "ImageTransform"

    @property
    def dim(self) -> int:
        """Width ``D`` of the output tokens."""
        return self.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def image_size(self) -> int:
        """The side of the square input the checkpoint was trained at (and `preprocess` resizes to)."""
        return self.config.image_size

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of patch tokens for an input of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def preprocess(
        self, images: "Image.Image | list[Image.Image]", *, size: tuple[int, int] | None = None
    ) -> Tensor:
        """PIL image(s) of any mode and size -> ``pixel_values`` with the checkpoint's official transform,
        resized to ``size`` (height, width) or to the training size."""
        return self.image_transform(images, size=size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError
