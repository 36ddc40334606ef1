"""Records: both JSONL styles and LLaVA's JSON arrays, every DataError, encoding, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyvlm.data import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_records,
    pack,
    read_records,
    split_records,
)
from tinyvlm.errors import DataError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    return tmp_path


def write(folder: Path, *records: object) -> Path:
    path = folder / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


LLAVA = {
    "image": "img/a.png",
    "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
}
MESSAGES = {
    "images": ["img/a.png", "b.png"],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image><image>Which is bigger?"},
        {"role": "assistant", "content": "the first"},
    ],
}


def test_both_styles_parse(folder: Path) -> None:
    path = write(folder, LLAVA, "", MESSAGES)
    llava, messages = read_records(path)
    assert llava.images == (folder / "img" / "a.png",)
    assert llava.messages == (
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "red"},
    )
    assert llava.where == f"{path}:1"
    assert messages.images == (folder / "img" / "a.png", folder / "b.png")
    assert messages.where == f"{path}:3"
    assert messages.answer == "the first"
    assert [m["role"] for m in messages.prompt] == ["system", "user"]


def test_content_parts_and_text_only(folder: Path) -> None:
    parts = {
        "images": ["b.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        ],
    }
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    first, second = read_records(write(folder, parts, text_only))
    assert first.messages[0]["content"] == "<image>Colour?" and first.messages[1]["content"] == "blue"
    assert second.images == ()


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"image": "img/a.png", "conversations": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"image": "img/a.png"}, "expected exactly one of 'conversations'"),
        ({**LLAVA, "messages": MESSAGES["messages"]}, "expected exactly one of 'conversations'"),
        ({**LLAVA, "image": "img/missing.png"}, "image '{folder}/img/missing.png' not found"),
        ({**LLAVA, "image": "broken.png"}, "cannot read image '{folder}/broken.png'"),
        ({**LLAVA, "conversations": LLAVA["conversations"][:1]}, "no assistant turn"),
        ({**LLAVA, "conversations": []}, "non-empty list of turns"),
        ({**LLAVA, "conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
        ({**LLAVA, "conversations": [{"from": "human"}]}, "turn 0 must be an object with 'from' and 'value'"),
        ({**MESSAGES, "images": ["b.png"]}, "2 <image> tag(s) but 1 image(s)"),
        (
            {**LLAVA, "image": 5},
            "'image' must be a path",
        ),
        (
            {"images": ["img/a.png", "b.png"], "messages": [
                {"role": "user", "content": "<image> one"}, {"role": "assistant", "content": "x"}]},
            "2 images but only 1 <image> tag(s)",
        ),
    ],
)
def test_every_data_error_names_file_line_and_problem(folder: Path, line: object, problem: str) -> None:
    path = write(folder, LLAVA, line)
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert f"{path}:2: " in message
    assert problem.format(folder=folder) in message
    assert f"{path}:1" not in message  # the good line is not blamed


def test_all_bad_lines_reported_at_once(folder: Path) -> None:
    path = write(folder, "{", LLAVA, {**LLAVA, "image": "nope.png"})
    with pytest.raises(DataError, match=r"2 bad record\(s\).*:1: not valid JSON.*:3: image .*nope.png' not found"):
        read_records(path)


def test_missing_and_empty_data_file(folder: Path) -> None:
    with pytest.raises(DataError, match="training data file not found"):
        read_records(folder / "absent.jsonl")
    (folder / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_records(folder / "empty.jsonl")


def fake_encode(messages, images):
    """Stands in for the processor: 2 ids per image, 1 per character; labels on assistant text only."""
    ids, labels = [1], [IGNORE_INDEX]
    for message in messages:
        text = message["content"].replace("<image>", "")
        body = [7] * (2 * len(images) * (message["role"] == "user")) + [ord(c) for c in text]
        ids += body
        labels += body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body)
        images = [] if message["role"] == "user" else images
    return ids, labels


def test_encode_records_checks_length(folder: Path) -> None:
    records = read_records(write(folder, LLAVA, MESSAGES))
    examples = encode_records(records, fake_encode, max_length=None)
    assert [len(e) for e in examples] == [
        1 + 2 + len("\nWhat colour?") + len("red"),
        1 + len("Be brief.") + 4 + len("Which is bigger?") + len("the first"),
    ]
    with pytest.raises(DataError, match=r"1 record\(s\) cannot be used: .*:2: 39 tokens, more than max_length=20"):
        encode_records(records, fake_encode, max_length=20)


def test_split_is_seeded_and_disjoint(folder: Path) -> None:
    records = read_records(write(folder, *[LLAVA] * 20))
    train, val = split_records(records, 0.1, seed=3)
    assert len(train) == 18 and len(val) == 2
    assert {r.where for r in train}.isdisjoint(r.where for r in val)
    assert [r.where for r in val] == [r.where for r in split_records(records, 0.1, seed=3)[1]]
    assert split_records(records, 0.0, seed=3) == (records, [])


def test_pack_first_fit_decreasing() -> None:
    bins = pack([5, 9, 3, 7, 1], max_length=10)
    assert bins == [[1, 4], [3, 2], [0]]
    assert all(sum([5, 9, 3, 7, 1][i] for i in b) <= 10 for b in bins)
    with pytest.raises(DataError):
        pack([11], max_length=10)


def test_collate_padded_and_packed() -> None:
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3], ())
    b = Example([4, 5], [IGNORE_INDEX, 5], ())
    c = Example([6, 7, 8, 9], [6, 7, 8, 9], ())
    none = [torch.empty(0, 3, 4, 4)] * 3
    padded = collate([a, b, c], none, pad_id=0, packed=False, max_length=None)
    assert padded.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert padded.labels[2].tolist() == [IGNORE_INDEX, 7, 8, 9]  # a sample's first label is never predicted
    assert padded.position_ids is None and padded.pixel_values is None and padded.num_tokens == 9

    packed = collate([a, b, c], none, pad_id=0, packed=True, max_length=6)
    assert packed.input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert packed.segments.tolist() == [[2, 2, 2, 2, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert packed.labels.tolist() == [
        [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, 5],
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    mask = packed.attention_mask
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert not mask[0, 0, 4:, :4].any() and not mask[0, 0, :4, 4:].any()  # no attention across samples
    assert mask[0, 0, :4, :4].all() and mask[0, 0, 4:, 4:].all()
    assert mask[1, 0, 3:, 3:].all() and not mask[1, 0, 3:, :3].any()  # padding is its own block


def test_collate_orders_images_row_by_row() -> None:
    examples = [Example([1] * 4, [1] * 4, ()), Example([2] * 2, [2] * 2, ()), Example([3] * 3, [3] * 3, ())]
    pixels = [torch.full((1, 3, 2, 2), float(i)) for i in range(3)]
    packed = collate(examples, pixels, pad_id=0, packed=True, max_length=6)
    assert packed.input_ids[:, 0].tolist() == [1, 3]
    assert packed.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # row 0 holds samples 0 and 1


def test_a_json_array_is_read_like_llava_files(folder: Path) -> None:
    """LLaVA's own training files (llava_v1_5_mix665k.json) are one JSON array of {id, image, conversations}."""
    path = folder / "mix.json"
    path.write_text(json.dumps([{"id": "a", **LLAVA}, {"id": "b", **MESSAGES}, {"id": "c", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
    llava, messages, text_only = read_records(path)
    assert llava.images == (folder / "img" / "a.png",) and llava.where == f"{path}[0]"
    assert messages.answer == "the first" and text_only.images == ()
    path.write_text(json.dumps([LLAVA, {**LLAVA, "image": "nope.png"}]))
    with pytest.raises(DataError, match=rf"{path}\[1\]: image .*nope.png' not found"):
        read_records(path)
