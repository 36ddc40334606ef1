"""The processor's token layout: placeholders, several images, tiles with row/column tokens, chat and plain
formats, assistant-only labels, left padding, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyvlm.errors import DataError
from tinyvlm.processing.image import ImageTransform
from tinyvlm.processing.processor import IGNORE_INDEX, Processor
from tinyvlm.processing.tokens import ImageTokenConfig
from tinyvlm.tokenizer import load_tokenizer

S = 16  # view size of the test processor
PER_VIEW = 3  # image tokens per view


def make_processor(decoder: str = "test-llama", *, chat: bool = True, **tokens) -> Processor:
    tokenizer = load_tokenizer(decoder)
    if not chat:
        tokenizer.chat_template = None
    config = ImageTokenConfig(**tokens).resolved("nanovlm")  # the layout these tests read
    tokenizer.add_special_tokens([*config.marker_tokens(), config.image_token])
    eos = tokenizer.eos_token_id
    transform = ImageTransform(size=(S, S))
    return Processor(
        tokenizer, transform, tokens=config, image_size=S, tokens_per_view=PER_VIEW, eos_token_id=eos, max_length=200
    )


def image(color: tuple[int, int, int], size: tuple[int, int] = (20, 20)) -> Image.Image:
    generator = torch.Generator().manual_seed(sum(color))
    noise = torch.randint(0, 255, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    noise[..., 0] = color[0]
    return Image.fromarray(noise.numpy())


def test_placeholder_expands_in_place() -> None:
    p = make_processor()
    ids, _ = p.encode_prompt("Look: <image> what colour?", [image((255, 0, 0))])
    text = p.tokenizer.apply_chat_template([{"role": "user", "content": "Look: <image> what colour?"}])
    before, after = text.split("<image>")
    enc = lambda t: p.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert ids == enc(before) + [p.image_token_id] * PER_VIEW + enc(after)


def test_images_go_before_the_text_without_placeholders() -> None:
    p = make_processor()
    img = image((255, 0, 0))
    assert p.encode_prompt("what colour?", [img])[0] == p.encode_prompt("<image>what colour?", [img])[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what colour?"}]
    placed = [messages[0], {"role": "user", "content": "<image>what colour?"}]
    assert p.encode_prompt(messages, [img])[0] == p.encode_prompt(placed, [img])[0]


def test_content_parts_are_accepted() -> None:
    p = make_processor()
    img = image((1, 2, 3))
    parts = [{"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    plain = [{"role": "user", "content": "A <image>?"}]
    assert p.encode_prompt(parts, [img])[0] == p.encode_prompt(plain, [img])[0]


def test_several_images_keep_their_order() -> None:
    p = make_processor()
    red, blue = image((250, 0, 0)), image((10, 0, 250), size=(30, 12))
    batch = p("First <image>, second <image>: which is red?", [red, blue])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(p.image_token_id) == 2 * PER_VIEW
    text_between = ids[ids.index(p.image_token_id) + PER_VIEW :]
    assert text_between[0] != p.image_token_id  # two separate runs
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, S, S)
    torch.testing.assert_close(pixels[0], p.preprocess([red])[0])
    torch.testing.assert_close(pixels[1], p.preprocess([blue])[0])


def test_tiles_with_row_and_column_tokens() -> None:
    p = make_processor(split_images=True, max_grid=4)
    big = image((100, 100, 100), size=(3 * S - 4, 2 * S - 3))  # width -> 3 tiles, height -> 2 tiles
    ids, _ = p.encode_prompt("<image>", [big])
    run = [p.image_token_id] * PER_VIEW
    expected = [p.marker_ids["<|global_image|>"], *run]
    for r in (1, 2):
        for c in (1, 2, 3):
            expected += [p.marker_ids[f"<row_{r}_col_{c}>"], *run]
    start = ids.index(p.marker_ids["<|global_image|>"])
    assert ids[start : start + len(expected)] == expected
    views = p.pixel_values([big])
    assert views.shape == (7, 3, S, S)
    torch.testing.assert_close(views[0], p.preprocess([big], size=(S, S))[0])
    whole = p.preprocess([big], size=(2 * S, 3 * S))[0]
    for k, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
        torch.testing.assert_close(views[1 + k], whole[:, r * S : (r + 1) * S, c * S : (c + 1) * S])


def test_small_images_keep_only_the_global_view_and_the_grid_is_capped() -> None:
    p = make_processor(split_images=True, max_grid=2)
    small = image((5, 5, 5), size=(S, S - 2))
    ids, _ = p.encode_prompt("<image>", [small])
    assert ids.count(p.image_token_id) == PER_VIEW and p.marker_ids["<|global_image|>"] in ids
    huge = image((5, 5, 5), size=(10 * S, 3 * S))
    assert p.grid(huge) == (2, 2)
    assert p.pixel_values([huge]).shape[0] == 1 + 4


def test_left_padding_for_batches() -> None:
    p = make_processor()
    batch = p(["short", "a much longer prompt with <image> inside"], [[], [image((9, 9, 9))]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short = p.encode_prompt("short")[0]
    assert ids.shape[0] == 2 and mask[1].all()
    pad = ids.shape[1] - len(short)
    assert mask[0].tolist() == [0] * pad + [1] * len(short)
    assert ids[0, pad:].tolist() == short and (ids[0, :pad] == p.pad_token_id).all()
    assert batch["pixel_values"].shape == (1, 3, S, S)


@pytest.mark.parametrize("chat", [False, True], ids=["base", "instruct"])
@pytest.mark.parametrize("decoder", ["test-llama", "test-gemma3"])
def test_a_string_prompt_is_the_user_turn_training_renders(decoder: str, chat: bool) -> None:
    """Defect 11: a string is one user turn rendered by the training code path (base decoders: the
    ``User: ...`` transcript, not the bare text), with the generation prompt."""
    p = make_processor(decoder, chat=chat)
    img = image((200, 0, 0))
    question = "<image>\nWhat colour?"
    ids = p(question, images=[img])["input_ids"][0].tolist()
    example, labels = p.encode_example([{"role": "user", "content": question}, {"role": "assistant", "content": "red"}], [img])
    answer_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids == example[:answer_start]
    assert ids == p(text=question, images=[img])["input_ids"][0].tolist()  # transformers' keyword names
    assert ids == p([{"role": "user", "content": question}], [img])["input_ids"][0].tolist()
    if not chat:
        assert p.tokenizer.decode(ids, skip_special_tokens=True) == "User: \nWhat colour?\nAssistant:"


@pytest.mark.parametrize("chat", [False, True], ids=["base", "instruct"])
def test_raw_prompts_are_plain_text_to_continue(chat: bool) -> None:
    p = make_processor("test-gemma3", chat=chat)  # Gemma's tokenizer adds a BOS
    img = image((1, 1, 1))
    enc = lambda t: p.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    bos = [p.tokenizer.bos_token_id]
    ids = p("Describe <image> here", images=[img], raw=True)["input_ids"][0].tolist()
    assert ids == bos + enc("Describe ") + [p.image_token_id] * PER_VIEW + enc(" here")
    assert p("The sky is", raw=True)["input_ids"][0].tolist() == p.tokenizer.encode("The sky is")
    placed = p("What colour?", images=[img], raw=True)["input_ids"][0].tolist()  # no placeholder: images first
    assert placed == bos + [p.image_token_id] * PER_VIEW + enc("What colour?")
    assert ids != p("Describe <image> here", images=[img])["input_ids"][0].tolist()
    with pytest.raises(DataError, match="raw=True takes a string prompt"):
        p([{"role": "user", "content": "Hi"}], raw=True)


def test_plain_transcript_of_chat_messages() -> None:
    p = make_processor(chat=False)
    chat_ids, _ = p.encode_prompt([{"role": "user", "content": "Hi"}])
    assert p.tokenizer.decode(chat_ids).endswith("User: Hi\nAssistant:")


@pytest.mark.parametrize("decoder, end", [("test-llama", "<|im_end|>\n"), ("test-gemma3", "<end_of_turn>\n")])
def test_labels_cover_assistant_turns_and_their_end_token(decoder: str, end: str) -> None:
    p = make_processor(decoder)
    messages = [
        {"role": "user", "content": "<image>What colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "a square"},
    ]
    ids, labels = p.encode_example(messages, [image((200, 0, 0))])
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    runs, current = [], [labelled[0]]
    for i in labelled[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    assert [p.tokenizer.decode([ids[i] for i in run]) for run in runs] == ["red" + end, "a square" + end]
    # the prompt of the first turn is exactly what generation sees
    prompt, _ = p.encode_prompt(messages[:1], [image((200, 0, 0))])
    assert ids[: len(prompt)] == prompt and labelled[0] == len(prompt)


def test_plain_labels_end_with_eos() -> None:
    p = make_processor(chat=False)
    ids, labels = p.encode_example([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "yes"}], [])
    labelled = [ids[i] for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled[-1] == p.eos_token_id
    assert p.tokenizer.decode(labelled[:-1]) == " yes"


def test_text_only_layout_without_images_and_none_images_without_splitting() -> None:
    p = make_processor()
    messages = [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]
    with_none = p.encode_example(messages, [None])
    with_image = p.encode_example(messages, [image((3, 3, 3))])
    assert with_none == with_image
    with pytest.raises(DataError, match="image splitting"):
        make_processor(split_images=True).encode_example(messages, [None])


def test_image_count_errors() -> None:
    p = make_processor()
    img = image((1, 1, 1))
    with pytest.raises(DataError, match="too many images: the prompt has 1 <image> placeholder.* but 2"):
        p.encode_prompt("one <image>", [img, img])
    with pytest.raises(DataError, match="too few images: the prompt has 2"):
        p.encode_prompt("<image> and <image>", [img])
    with pytest.raises(DataError, match="per-prompt lists"):
        p(["a", "b"], [img, img])


def test_unreadable_image_file(tmp_path: Path) -> None:
    p = make_processor()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image file .*broken.png"):
        p.encode_prompt("<image>", [bad])
    with pytest.raises(DataError, match="missing.png"):
        p.encode_prompt("<image>", [tmp_path / "missing.png"])


def test_too_long_prompt() -> None:
    p = make_processor()
    with pytest.raises(DataError, match="more than the decoder's 200"):
        p.encode_prompt("<image>" * 70, [image((1, 1, 1))] * 70)


def test_image_paths_are_read(tmp_path: Path) -> None:
    p = make_processor()
    img = image((7, 8, 9))
    img.save(tmp_path / "a.png")
    torch.testing.assert_close(p([("x <image>")], [[tmp_path / "a.png"]])["pixel_values"], p.preprocess([img]))
