"""Image preprocessing: PIL images of any mode and size -> normalised ``pixel_values``.

One `ImageTransform` describes a checkpoint's official preprocessing (squash-resize to a fixed size, rescale
by 1/255, normalise with a mean and std). Each encoder exposes its own as ``encoder.image_transform``; it is a
plain frozen dataclass, so a processor that cuts an image into tiles can reuse it on the tiles, at the
checkpoint's size or another one (``transform(tiles, size=(h, w))``).

Two resize backends reproduce the two backends of the transformers image processors exactly:

* ``"pil"`` (SigLIP / SigLIP2, transformers' ``*ImageProcessorPil``): the uint8 image is resized by PIL,
  then rescaled and normalised. PIL's resize is antialiased when downscaling.
* ``"torch"`` (DINOv3, whose processor rescales *before* it resizes): the image is rescaled to float first and
  resized with ``torch.nn.functional.interpolate(..., antialias=True)``, as torchvision does for float
  tensors, so the resized values are not rounded to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tinyvlm.errors import ConfigError, DataError

#: Pixel values are rescaled from [0, 255] to [0, 1] before normalisation.
RESCALE = 1 / 255

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, palette with a transparent index) is composited onto
    white, as the transformers image processors do; other modes (L, P, CMYK, I;16, ...) convert directly."""
    if not isinstance(image, Image.Image):
        raise DataError(
            f"expected a PIL.Image.Image, got {type(image).__module__}.{type(image).__name__}; "
            "open files with PIL.Image.open(path) and arrays with PIL.Image.fromarray(array)"
        )
    if image.width < 1 or image.height < 1:
        raise DataError(f"the image is empty ({image.width}x{image.height} pixels); pass an image with pixels")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize to ``size`` (height, width) without keeping the aspect ratio, rescale by 1/255, normalise.

    ``transform(images, size=None)`` takes one PIL image or a sequence of them and returns a float32
    ``[B, 3, H, W]`` tensor; ``size`` overrides the default size for this call.
    """

    size: tuple[int, int]
    resample: Image.Resampling = Image.Resampling.BICUBIC
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    backend: Literal["pil", "torch"] = "pil"

    def __post_init__(self) -> None:
        _check_size(self.size)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if self.backend not in ("pil", "torch"):
            raise ConfigError(f"backend must be 'pil' or 'torch', got {self.backend!r}")
        if self.backend == "torch" and self.resample not in _TORCH_MODES:
            raise ConfigError(
                f"the torch backend resizes with bilinear or bicubic only, not {Image.Resampling(self.resample).name}"
            )

    def __call__(self, images: Image.Image | Sequence[Image.Image], *, size: tuple[int, int] | None = None) -> Tensor:
        height, width = _check_size(size) if size is not None else self.size
        batch = [images] if isinstance(images, Image.Image) else list(images)
        if not batch:
            raise DataError("no images to preprocess (got an empty sequence)")
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return torch.stack([(self._resized(to_rgb(image), height, width) - mean) / std for image in batch])

    def _resized(self, image: Image.Image, height: int, width: int) -> Tensor:
        """The RGB image resized to ``height`` x ``width`` and rescaled to [0, 1]: float32 ``[3, H, W]``."""
        if self.backend == "pil":
            pixels = torch.from_numpy(np.asarray(image.resize((width, height), self.resample)).copy())
            # float64 product then float32, as transformers' rescale does, so the result is bit-identical
            return (pixels.permute(2, 0, 1).double() * RESCALE).float()
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) * RESCALE
        if pixels.shape[-2:] == (height, width):
            return pixels
        resized = F.interpolate(
            pixels[None], size=(height, width), mode=_TORCH_MODES[self.resample], align_corners=False, antialias=True
        )
        return resized[0]


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ConfigError(f"size must be (height, width) with two positive ints, got {size!r}")
    return int(size[0]), int(size[1])
