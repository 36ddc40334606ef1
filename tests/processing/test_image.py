"""`ImageTransform` against the reference preprocessing, for PIL images of every common mode.

SigLIP / SigLIP2: transformers' ``SiglipImageProcessorPil`` (the torchvision-free backend), bit for bit.
DINOv3: transformers' ``DINOv3ViTImageProcessor`` needs torchvision, which cannot be installed next to this
torch. Its steps are convert to RGB (transparency onto white) -> rescale to float -> antialiased bilinear resize
of the float image -> ImageNet normalisation; the resize is checked against PIL's own float ("F" mode)
bilinear resize, an independent implementation of the same antialiased filter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tinyvlm
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.processing.image import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, to_rgb

transformers = pytest.importorskip("transformers")


def _images() -> dict[str, Image.Image]:
    """One image per mode, odd sizes, random content (alpha and palette transparency included)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (61, 29, 4), dtype=np.uint8), mode="RGBA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 3
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "L": Image.fromarray(rng.integers(0, 256, (80, 90), dtype=np.uint8)),
        "LA": rgba.convert("LA"),
        "P": palette,
        "P-transparent": transparent_palette,
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)),
    }


IMAGES = _images()


@pytest.mark.parametrize("mode", list(IMAGES))
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR], ids=["siglip", "siglip2"])
@pytest.mark.parametrize("size", [(64, 64), (32, 48)])
def test_siglip_equals_reference_processor(mode, resample, size):
    image = IMAGES[mode]
    reference = transformers.SiglipImageProcessorPil(size={"height": size[0], "width": size[1]}, resample=resample)
    expected = reference(image, return_tensors="pt")["pixel_values"]
    ours = ImageTransform(size=size, resample=resample)(image)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, *size)
    assert torch.equal(ours, expected)


def _dinov3_reference(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Rescale -> bilinear antialiased resize in float (PIL "F" mode, channel by channel) -> normalise."""
    rgb = np.asarray(transformers.image_transforms.convert_to_rgb(image, return_numpy=True), dtype=np.float32) / 255
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), mode="F").resize(size[::-1], Image.BILINEAR))
        for c in range(3)
    ]
    resized = torch.from_numpy(np.stack(channels))
    return ((resized - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None]


@pytest.mark.parametrize("mode", list(IMAGES))
@pytest.mark.parametrize("size", [(64, 64), (32, 48), (96, 40)])
def test_dinov3_preprocessing(mode, size):
    encoder = tinyvlm.build_encoder("test-dinov3")
    ours = encoder.preprocess(IMAGES[mode], size=size)
    expected = _dinov3_reference(IMAGES[mode], size)
    # 1e-4 is ~1/170 of one uint8 step after normalisation: a uint8 (rounded) resize or another filter fails
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_dinov3_resizes_floats_not_uint8():
    """The DINOv3 reference rescales before it resizes; resizing the uint8 image would round the result."""
    image = IMAGES["RGB"]
    ours = ImageTransform(size=(64, 64), resample=Image.BILINEAR, backend="torch")(image)
    rounded = ImageTransform(size=(64, 64), resample=Image.BILINEAR, backend="pil")(image)
    assert (ours - rounded).abs().max() > 1e-3


def test_to_rgb_composites_transparency_on_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(IMAGES["L"]).mode == "RGB"


def test_batch_single_and_size_override():
    transform = tinyvlm.build_encoder("test-siglip").image_transform
    images = [IMAGES["RGB"], IMAGES["L"], IMAGES["RGBA"]]
    batch = transform(images)
    assert batch.shape == (3, 3, 64, 64)
    assert torch.equal(batch[1:2], transform(images[1]))
    assert transform(images, size=(16, 24)).shape == (3, 3, 16, 24)
    # the checkpoint values: x / 127.5 - 1
    white = transform(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white))


def test_default_sizes_follow_the_checkpoint():
    assert tinyvlm.build_encoder("test-siglip").preprocess(IMAGES["RGB"]).shape == (1, 3, 64, 64)
    assert tinyvlm.build_encoder("test-dinov3").preprocess([IMAGES["P"]] * 2).shape == (2, 3, 64, 64)


def test_bad_inputs():
    transform = ImageTransform(size=(8, 8))
    with pytest.raises(DataError, match="PIL.Image.fromarray"):
        transform(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        transform([])
    with pytest.raises(ConfigError, match="height, width"):
        transform(IMAGES["RGB"], size=(8, 0))
    with pytest.raises(ConfigError, match="height, width"):
        ImageTransform(size=224)
    with pytest.raises(ConfigError, match="bilinear or bicubic"):
        ImageTransform(size=(8, 8), resample=Image.Resampling.LANCZOS, backend="torch")


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_an_empty_image_is_a_data_error(size):
    import tinyvlm
    from tinyvlm.errors import DataError

    empty = Image.new("RGB", size)
    with pytest.raises(DataError, match=rf"the image is empty \({size[0]}x{size[1]} pixels\)"):
        tinyvlm.build_encoder("test-siglip").preprocess(empty)
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama")
    with pytest.raises(DataError, match="the image is empty"):
        vlm.generate("<image>What is it?", images=[empty], max_new_tokens=2)
