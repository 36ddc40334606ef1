"""SmolVLM preprocessing against transformers' Idefics3Processor (PIL image processor): same input_ids, same
pixel values, for images of several sizes and aspect ratios, with and without image splitting."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))

from twins import hf_processor, write_smolvlm_processor_files  # noqa: E402

from tinyvlm.processing.splitting import CHAT_TEMPLATE, SmolVLMImageSplitter, image_prompt  # noqa: E402

pytest.importorskip("transformers")

SIZES = [(30, 50), (64, 20), (32, 32), (7, 300), (128, 128), (200, 90), (16, 16)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """tinyvlm's jinja rendering (the Tokenizer's) of the string-content SmolVLM template."""
    from tinyvlm.tokenizer import _compile

    return _compile(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module", params=[True, False], ids=["split", "no-split"])
def processor_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("smolvlm-processor")
    write_smolvlm_processor_files(folder, image_seq_len=4, longest_edge=128, tile=32, do_image_splitting=request.param)
    return folder, request.param


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tokens_and_pixels_match_transformers(processor_folder, size: tuple[int, int]) -> None:
    from tokenizers import Tokenizer

    folder, splitting = processor_folder
    reference = hf_processor(folder)
    image = _image(*size, seed=size[0] * 1000 + size[1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True)
    expected = reference(text=text, images=[image], return_tensors="pt")

    splitter = SmolVLMImageSplitter(tile=32, longest_edge=128, do_image_splitting=splitting)
    frames, rows, cols = splitter.split(image)
    prompt = _render([{"role": "user", "content": "<image>What is in this image?"}])
    assert prompt == text
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        prompt.replace("<image>", image_prompt(rows, cols, 4)), add_special_tokens=False
    ).ids
    assert ids == expected["input_ids"][0].tolist()
    pixels = splitter.transform()(frames)
    assert pixels.shape == expected["pixel_values"].shape[1:]
    torch.testing.assert_close(pixels, expected["pixel_values"][0], rtol=0, atol=1e-6)
    if not splitting:
        assert (rows, cols) == (0, 0)


def test_chat_prompt_text_first_and_multi_turn(processor_folder) -> None:
    folder, _ = processor_folder
    reference = hf_processor(folder)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "ok?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ]
    ours = [
        {"role": "user", "content": "Look: <image>ok?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Colour?"},
    ]
    assert _render(ours) == reference.apply_chat_template(messages, add_generation_prompt=True)
    assert _render(ours, add_generation_prompt=False) == reference.apply_chat_template(messages)


def test_image_prompt_equals_smolvlm_processor_function() -> None:
    """SmolVLM2's processor builds the same strings (its module function; the class needs num2words)."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    for rows, cols in [(0, 0), (1, 3), (2, 2), (4, 1)]:
        assert image_prompt(rows, cols, 5) == get_image_prompt_string(
            rows, cols, 5, fake_token_around_image="<fake_token_around_image>", image_token="<image>",
            global_image_token="<global-img>",
        )  # fmt: skip
