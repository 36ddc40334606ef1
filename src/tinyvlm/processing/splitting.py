"""SmolVLM / Idefics3 preprocessing: image splitting, the image token layout and the chat format.

Reproduces transformers' ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil`` and
``Idefics3Processor`` / ``SmolVLMProcessor`` for images (same pixels, same token ids):

1. **Resize** so that the longest edge is ``longest_edge`` (2048 for SmolVLM: small images are upscaled),
   the other edge rounded up to an even number; PIL LANCZOS on the uint8 image.
2. **Round up** both sides to multiples of the tile size (512), keeping the aspect ratio.
3. **Split** into ``rows x cols`` tiles of ``tile x tile`` (row-major) and append the **global** image (the
   whole picture resized to one tile). An image that fits in one tile is not split (rows = cols = 0).
   With ``do_image_splitting=False`` every image is squashed to one tile.
4. Rescale by 1/255 and normalise with mean = std = 0.5.

The prompt gets, in place of each ``<image>``::

    for each tile row r, col c:  <fake_token_around_image><row_{r}_col_{c}><image> * image_seq_len
    "\\n" after each row
    "\\n<fake_token_around_image><global-img>" <image> * image_seq_len "<fake_token_around_image>"

(an unsplit image has only the global part, without the leading newline). The image features fill the
``<image>`` positions in that order: tiles row-major, then the global image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from tinyvlm.processing.image import HALF, ImageTransform, to_rgb
from tinyvlm.processing.tokens import SMOLVLM_WRAP_TOKEN

FAKE_TOKEN = SMOLVLM_WRAP_TOKEN
IMAGE_TOKEN = "<image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

#: transformers' cap on the resized image (``MAX_IMAGE_SIZE``).
MAX_IMAGE_SIZE = 4096


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Longest edge to ``longest``, the other one by the aspect ratio rounded up to even (transformers'
    ``_resize_output_size_rescale_to_max_len`` then ``_resize_output_size_scale_below_upper_bound``)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides rounded up to multiples of ``tile`` (transformers' ``resize_for_vision_encoder``)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass(frozen=True)
class SmolVLMImageSplitter:
    """Cuts one image into its tiles and global view (PIL images) as SmolVLM's image processor does."""

    tile: int
    longest_edge: int | None = 2048
    do_image_splitting: bool = True
    resample: Image.Resampling = Image.Resampling.LANCZOS

    def split(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """``(frames, rows, cols)``: the tiles row-major then the global image, or one frame (rows = cols = 0)."""
        image = to_rgb(image)
        if self.longest_edge is not None:
            height, width = _longest_edge_size(image.height, image.width, self.longest_edge)
            image = image.resize((width, height), self.resample)
        if not self.do_image_splitting:
            return [image.resize((self.tile, self.tile), self.resample)], 0, 0
        height, width = _tile_multiple_size(image.height, image.width, self.tile)
        image = image.resize((width, height), self.resample)
        if height <= self.tile and width <= self.tile:
            return [image], 0, 0
        rows, cols = (height - self.tile) // self.tile + 1, (width - self.tile) // self.tile + 1
        t = self.tile
        tiles = [image.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        return [*tiles, image.resize((t, t), self.resample)], rows, cols

    def grid(self, image: Image.Image) -> tuple[int, int]:
        """The ``(rows, cols)`` of `split` from the image size alone (no resizing)."""
        if not self.do_image_splitting:
            return 0, 0
        height, width = image.height, image.width
        if self.longest_edge is not None:
            height, width = _longest_edge_size(height, width, self.longest_edge)
        height, width = _tile_multiple_size(height, width, self.tile)
        if height <= self.tile and width <= self.tile:
            return 0, 0
        return height // self.tile, width // self.tile

    def pixel_values(self, image: Image.Image) -> Tensor:
        """The ``[V, 3, tile, tile]`` views of one image in token order (tiles row-major, then global)."""
        frames, _, _ = self.split(image)
        return self.transform()(frames)

    def transform(self) -> ImageTransform:
        """Rescale + normalise of the (already tile-sized) frames."""
        return ImageTransform(size=(self.tile, self.tile), resample=self.resample, mean=HALF, std=HALF, backend="pil")


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one ``<image>`` placeholder (see the module docstring)."""
    global_part = FAKE_TOKEN + GLOBAL_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_TOKEN
    if rows == 0 and cols == 0:
        return global_part
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += FAKE_TOKEN + f"<row_{r + 1}_col_{c + 1}>" + IMAGE_TOKEN * image_seq_len
        text += "\n"
    return text + "\n" + global_part


#: SmolVLM's chat template (the Hub repos' ``chat_template.json``) for messages whose ``content`` is a string
#: with ``<image>`` placeholders (theirs takes lists of ``{"type": ...}`` parts and renders the same text)::
#:
#:     <|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:
#:
#: The role is capitalised and followed by ``":"`` when the message starts with an image, ``": "`` otherwise.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'].startswith('<image>') %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{{ message['content'] }}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
