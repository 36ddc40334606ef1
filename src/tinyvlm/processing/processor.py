"""From prompts and images to model inputs: chat formatting, image tokens, image splitting, padding.

Each image becomes a run of image tokens, one per projected feature, placed where the prompt has an
``<image>`` placeholder (or, when the prompt has none, all images go before the text). The model later
replaces those positions with the projector's outputs (`tinyvlm.vlm.VLM`), so the image token's own
embedding row is never looked up.

Token layout (`ImageTokenConfig.token_layout`), nanoVLM's (``"nanovlm"``): without splitting an image is
``N x <|image|>``. With splitting it is ``<|global_image|> N x <|image|>`` for the whole image resized to the
encoder's size, then for each tile, row by row, ``<row_i_col_j> N x <|image|>``; an image no larger than one
tile keeps only the global view. ``pixel_values`` holds every view (global first, then tiles) of every image
in the order their tokens appear. SmolVLM's (``"smolvlm"``: ``<fake_token_around_image>``, row/column tokens,
tiles first and the global view last, its own resize and split rule) is `tinyvlm.processing.splitting`.

Prompts: a string is one user turn; it and chat messages are rendered exactly as training renders
conversations: with the chat template of instruct decoders (the tokenizer ships one), else the minimal
transcript of `PLAIN_ROLES` (base decoders). ``raw=True`` takes a string as plain text to continue.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from tinyvlm.errors import ConfigError, DataError
from tinyvlm.processing.image import ImageTransform
from tinyvlm.processing.splitting import SmolVLMImageSplitter, image_prompt
from tinyvlm.processing.tokens import ImageTokenConfig

if TYPE_CHECKING:
    from tinyvlm.tokenizer import Tokenizer

#: The placeholder users write in prompts where an image goes.
IMAGE_PLACEHOLDER = "<image>"
#: Label of positions that do not count in the loss.
IGNORE_INDEX = -100
#: Base decoders (no chat template): how chat messages are written out. The assistant turn ends with the
#: decoder's end-of-sequence token, which the model learns to emit.
PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant:"}

ImageInput = Union[Image.Image, str, Path]
Message = dict[str, Any]
Prompt = Union[str, Sequence[Message]]


def load_image(image: ImageInput) -> Image.Image:
    """A PIL image, or the image file at a path (a `DataError` naming the file if it cannot be read)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot read image file {str(image)!r}: {error}") from None
    raise DataError(f"an image must be a PIL.Image.Image or a file path, got {type(image).__name__}")


class Processor:
    """Prompts + images -> ``input_ids``, ``attention_mask``, ``pixel_values`` for a `tinyvlm.vlm.VLM`.

    ``preprocess(images, size=(h, w))`` is the encoder's official transform; ``tokens_per_view`` the number of
    projected features of one ``image_size`` x ``image_size`` view; ``eos_token_id`` ends assistant turns
    of base decoders; ``max_length`` bounds the sequence (the decoder's context).
    """

    def __init__(
        self,
        tokenizer: "Tokenizer",
        preprocess: Callable[..., Tensor],
        *,
        tokens: ImageTokenConfig,
        image_size: int,
        tokens_per_view: int,
        eos_token_id: int | None,
        max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.preprocess = _rescale_only(image_size) if tokens.rescale_only else preprocess
        self.tokens = tokens
        self.image_size = image_size
        self.tokens_per_view = tokens_per_view
        self.eos_token_id = eos_token_id
        self.max_length = max_length
        self.image_token_id = _token_id(tokenizer, tokens.image_token)
        self.marker_ids = {token: _token_id(tokenizer, token) for token in tokens.marker_tokens()}
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (eos_token_id if eos_token_id is not None else 0)

    @property
    def chat(self) -> bool:
        """Whether prompts are formatted with the tokenizer's chat template (instruct decoders)."""
        return bool(self.tokenizer.chat_template)

    # ------------------------------------------------------------------------------------------ images

    def grid(self, image: Image.Image) -> tuple[int, int]:
        """Tile rows and columns of a split image: enough tiles of the encoder's size to cover it, at most
        ``max_grid`` per side; (1, 1) when splitting is off."""
        if not self.tokens.split_images:
            return 1, 1
        rows = min(self.tokens.max_grid, max(1, math.ceil(image.height / self.image_size)))
        cols = min(self.tokens.max_grid, max(1, math.ceil(image.width / self.image_size)))
        return rows, cols

    def views(self, image: Image.Image) -> Tensor:
        """The ``[V, 3, S, S]`` views of one image, in token order: the image itself, or with splitting the
        global view then the tiles of the image resized to ``rows*S`` x ``cols*S``, row by row."""
        if self.tokens.token_layout == "smolvlm":
            return self._smolvlm_splitter().pixel_values(image)
        s = self.image_size
        whole = self.preprocess([image], size=(s, s))
        rows, cols = self.grid(image)
        if (rows, cols) == (1, 1):
            return whole
        big = self.preprocess([image], size=(rows * s, cols * s))[0]  # [3, rows*S, cols*S]
        tiles = big.unfold(1, s, s).unfold(2, s, s)  # [3, rows, cols, S, S]
        tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, s, s)
        return torch.cat((whole, tiles))

    def pixel_values(self, images: Sequence[ImageInput]) -> Tensor:
        """All views of ``images`` stacked in the order of their tokens: ``[V, 3, S, S]``."""
        if not images:
            raise DataError("no images to preprocess")
        return torch.cat([self.views(load_image(image)) for image in images])

    def image_token_ids(self, grid: tuple[int, int] | None) -> list[int]:
        """The token ids of one image whose split grid is ``grid`` (None: not split)."""
        run = [self.image_token_id] * self.tokens_per_view
        if grid is None:
            return run
        rows, cols = grid
        ids = [self.marker_ids[self.tokens.global_image_token], *run]
        if (rows, cols) == (1, 1):
            return ids
        for r in range(1, rows + 1):
            for c in range(1, cols + 1):
                ids += [self.marker_ids[self.tokens.tile(r, c)], *run]
        return ids

    def _image_ids(self, image: Image.Image | None) -> list[int]:
        if self.tokens.token_layout == "smolvlm":
            rows, cols = self._smolvlm_splitter().grid(image) if image is not None else (0, 0)
            if image is None and self.tokens.split_images:
                raise DataError("with image splitting, the token layout depends on the image size: pass the images")
            # newlines between tile rows are text: tokenised with the rest (``\n\n`` may be one token)
            return self.tokenizer.encode(image_prompt(rows, cols, self.tokens_per_view), add_special_tokens=False)
        if not self.tokens.split_images:
            return self.image_token_ids(None)
        if image is None:
            raise DataError("with image splitting, the token layout depends on the image size: pass the images")
        return self.image_token_ids(self.grid(image))

    def _smolvlm_splitter(self) -> SmolVLMImageSplitter:
        return SmolVLMImageSplitter(
            tile=self.image_size, longest_edge=self.tokens.resize_longest_edge, do_image_splitting=self.tokens.split_images
        )

    # -------------------------------------------------------------------------------------------- text

    def encode_prompt(
        self, prompt: Prompt, images: Sequence[ImageInput] = (), *, raw: bool = False
    ) -> tuple[list[int], list[Image.Image]]:
        """One prompt -> its token ids and the loaded images in token order.

        A string is one user turn and chat messages are a conversation, both rendered by the code that
        renders training conversations (`encode_example`), ending with the generation prompt. With ``raw``,
        a string is plain text to continue: tokenised as is, with the BOS the tokenizer adds, no template
        and no role prefixes."""
        loaded = [load_image(image) for image in images]
        if raw:
            if not isinstance(prompt, str):
                raise DataError("raw=True takes a string prompt (plain text to continue), not chat messages")
            text = _with_images(prompt, len(loaded))
            segments: list[tuple[str | list[int], bool]] = [(self._bos(), False), (text, False)]
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            segments = self._segments(_place_images(_normalise(messages), len(loaded)), add_generation_prompt=True)
        ids, _ = self._encode(segments, loaded)
        return ids, loaded

    def encode_example(
        self, messages: Sequence[Message], images: Sequence[ImageInput | None] = ()
    ) -> tuple[list[int], list[int]]:
        """A training conversation -> ``(input_ids, labels)``; labels are -100 except on the assistant turns'
        tokens, including the end-of-turn token the model must learn to emit. ``images`` may be None entries
        when splitting is off (the layout then does not depend on the image)."""
        loaded = [None if image is None else load_image(image) for image in images]
        normalised = _place_images(_normalise(messages), len(loaded))
        if not any(m["role"] == "assistant" for m in normalised):
            raise DataError("the conversation has no assistant turn to learn from")
        return self._encode(self._segments(normalised, add_generation_prompt=False), loaded)

    def _bos(self) -> list[int]:
        """What the tokenizer puts before a text on its own (BOS for Llama-3 / Gemma, nothing for SmolLM2)."""
        return list(self.tokenizer.encode("", add_special_tokens=True))

    def _segments(self, messages: list[Message], *, add_generation_prompt: bool) -> list[tuple[str | list[int], bool]]:
        """The conversation as ``(text or ids, labelled)`` pieces; assistant turns are the labelled ones."""
        if not self.chat:
            return self._plain_segments(messages, add_generation_prompt=add_generation_prompt)
        render = self.tokenizer.apply_chat_template
        if messages[0]["role"] == "assistant":
            raise DataError("a conversation must start with a user (or system) turn")
        segments: list[tuple[str | list[int], bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True)
            after = render(messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise ConfigError(
                    "the chat template does not render conversations incrementally (a turn changes the text "
                    "before it), so assistant turns cannot be located for the labels"
                )
            segments += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        full = render(messages, add_generation_prompt=add_generation_prompt)
        if not full.startswith(done):
            raise ConfigError("the chat template does not render conversations incrementally")
        segments.append((full[len(done) :], False))
        return segments

    def _plain_segments(self, messages: list[Message], *, add_generation_prompt: bool) -> list[tuple[str | list[int], bool]]:
        if self.eos_token_id is None:
            raise ConfigError("a base decoder without an end-of-sequence token cannot take chat messages")
        segments: list[tuple[str | list[int], bool]] = [(self._bos(), False)]
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                segments += [(PLAIN_ROLES[role], False), (" " + content, True), ([self.eos_token_id], True), ("\n", False)]
            elif role == "system":
                segments.append((content + "\n\n", False))
            else:
                segments.append((PLAIN_ROLES[role] + content + "\n", False))
        if add_generation_prompt:
            segments.append((PLAIN_ROLES["assistant"], False))
        return segments

    def _encode(
        self, segments: list[tuple[str | list[int], bool]], images: Sequence[Image.Image | None]
    ) -> tuple[list[int], list[int]]:
        """Tokenise the pieces (placeholders become image tokens) -> ids and labels."""
        ids: list[int] = []
        labels: list[int] = []
        next_image = 0
        for piece, labelled in segments:
            if isinstance(piece, list):
                ids += piece
                labels += piece if labelled else [IGNORE_INDEX] * len(piece)
                continue
            for k, text in enumerate(piece.split(IMAGE_PLACEHOLDER)):
                if k > 0:
                    if next_image >= len(images):
                        raise DataError(_count_message(next_image + 1, len(images)))
                    run = self._image_ids(images[next_image])
                    next_image += 1
                    ids += run
                    labels += [IGNORE_INDEX] * len(run)
                if text:
                    text_ids = self.tokenizer.encode(text, add_special_tokens=False)
                    ids += text_ids
                    labels += text_ids if labelled else [IGNORE_INDEX] * len(text_ids)
        if next_image != len(images):
            raise DataError(_count_message(next_image, len(images)))
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(
                f"the prompt is {len(ids)} tokens long (images included), more than the decoder's "
                f"{self.max_length}: use fewer or smaller images (or image splitting off), or a shorter text"
            )
        return ids, labels

    # ------------------------------------------------------------------------------------------- batch

    def __call__(
        self,
        text: Prompt | Sequence[Prompt],
        images: Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        *,
        raw: bool = False,
    ) -> dict[str, Tensor | None]:
        """One prompt with its images, or a list of prompts with one image list each -> a left-padded batch:
        ``input_ids`` [B, T], ``attention_mask`` [B, T] (0 on padding) and ``pixel_values`` [V, 3, S, S]
        (None without images). ``text``, ``images``: transformers' processor keyword names; a prompt is
        formatted as `encode_prompt` says (``raw``: plain text to continue)."""
        prompt_list, image_lists = split_batch(text, images)
        rows, views = [], []
        for prompt, row_images in zip(prompt_list, image_lists):
            ids, loaded = self.encode_prompt(prompt, row_images, raw=raw)
            rows.append(ids)
            views += [self.views(image) for image in loaded]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, width - len(row) :] = 1
        pixel_values = torch.cat(views) if views else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def split_batch(
    prompts: Prompt | Sequence[Prompt], images: Any
) -> tuple[list[Prompt], list[list[ImageInput]]]:
    """Normalise ``(prompt, images)`` or ``([prompts], [[images], ...])`` to lists of equal length."""
    if is_single_prompt(prompts):
        if images is None:
            return [prompts], [[]]
        return [prompts], [[images] if isinstance(images, (Image.Image, str, Path)) else list(images)]
    prompt_list = list(prompts)  # type: ignore[arg-type]
    if not prompt_list:
        raise DataError("no prompts given")
    if images is None:
        return prompt_list, [[] for _ in prompt_list]
    image_lists = list(images)
    if len(image_lists) != len(prompt_list) or any(isinstance(i, (Image.Image, str, Path)) for i in image_lists):
        raise DataError(
            f"with {len(prompt_list)} prompts, pass images as a list of {len(prompt_list)} per-prompt lists "
            "(an empty list for a prompt without images)"
        )
    return prompt_list, [list(row) for row in image_lists]


def is_single_prompt(prompt: Any) -> bool:
    """A string, or chat messages (a list of dicts), as opposed to a list of prompts."""
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict))


def _normalise(messages: Sequence[Message]) -> list[Message]:
    """Messages with string contents; a list content (``[{"type": "image"}, {"type": "text", "text": ...}]``,
    as transformers' processors take) becomes text with ``<image>`` placeholders."""
    if not messages:
        raise DataError("no messages given")
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"a chat message is a dict with 'role' and 'content', got {message!r}")
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(IMAGE_PLACEHOLDER)
                elif kind == "text":
                    parts.append(part["text"])
                else:
                    raise DataError(f"a content part is {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {part!r}")
            content = "".join(parts)
        elif not isinstance(content, str):
            raise DataError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        if message["role"] not in PLAIN_ROLES:
            raise DataError(f"unknown chat role {message['role']!r}; use system, user or assistant")
        out.append({"role": message["role"], "content": content})
    return out


def _with_images(text: str, count: int) -> str:
    """``text`` with ``count`` placeholders before it when it has none."""
    found = text.count(IMAGE_PLACEHOLDER)
    if found == 0:
        return IMAGE_PLACEHOLDER * count + text
    if found != count:
        raise DataError(_count_message(found, count))
    return text


def _place_images(messages: list[Message], count: int) -> list[Message]:
    """With no placeholder anywhere, the images go before the text of the first user turn."""
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if found == 0 and count:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise DataError("images need a user turn to go in")
        messages = list(messages)
        messages[first] = {**messages[first], "content": IMAGE_PLACEHOLDER * count + messages[first]["content"]}
    elif found != count:
        raise DataError(_count_message(found, count))
    return messages


def _count_message(placeholders: int, images: int) -> str:
    more = "too many images" if images > placeholders else "too few images"
    return (
        f"{more}: the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {images} image(s) were "
        f"given. Put one {IMAGE_PLACEHOLDER} where each image goes, or none to place all images before the text."
    )


def _rescale_only(size: int) -> Callable[..., Tensor]:
    """nanoVLM v0.1's preprocessing: bilinear resize, then [0, 1] (no mean / std)."""
    return ImageTransform(size=(size, size), resample=Image.Resampling.BILINEAR, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _token_id(tokenizer: "Tokenizer", token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(
            f"{token!r} is not a token of this tokenizer; build the model with build_vlm (which adds the "
            "image tokens) or load it with load_vlm"
        )
    return token_id
