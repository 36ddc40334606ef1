"""The loader: rows encoded and their images decoded in workers exactly as the processor does at inference
(image splitting included), samples longer than max_length skipped and named, bad images raised in the main
process, and the same micro-batches with 0 or 2 workers."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import tinyvlm
from tinyvlm.data.loading import Collator, SampleMaker, load
from tinyvlm.data.records import IGNORE_INDEX, EncodedImage, Record
from tinyvlm.errors import DataError


def encoded(colour: str, size: tuple[int, int]) -> EncodedImage:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return EncodedImage(buffer.getvalue(), f"{colour}.png")


def record(i: int, size: tuple[int, int] = (40, 40), answer: str = "red") -> Record:
    messages = ({"role": "user", "content": f"What colour is picture {i}?"}, {"role": "assistant", "content": answer})
    return Record(messages, (encoded(("red", "green", "blue")[i % 3], size),), f"rows row {i}")


@pytest.fixture(scope="module")
def split_vlm():
    return tinyvlm.build_vlm("test-vlm", processor_kwargs={"split_images": True, "max_grid": 2, "token_layout": "nanovlm"})


def test_a_row_is_encoded_as_the_processor_encodes_its_prompt_at_inference(split_vlm) -> None:
    processor = split_vlm.processor
    row = record(0, size=(128, 96))  # 2 x 2 tiles of the 64-pixel encoder, plus the global view
    prepared = SampleMaker(processor, max_length=None)[row]
    example = prepared.example
    image = Image.open(io.BytesIO(row.images[0].data))
    prompt_ids, _ = processor.encode_prompt(row.prompt, [image])
    assert example.input_ids[: len(prompt_ids)] == prompt_ids  # the training prefix is the inference prompt
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert split_vlm.tokenizer.decode(labelled) == "red<|im_end|>\n"
    assert example.input_ids.count(split_vlm.image_token_id) == 5 * processor.tokens_per_view
    marker = processor.marker_ids
    assert [marker[t] in example.input_ids for t in ("<|global_image|>", "<row_1_col_1>", "<row_2_col_2>")] == [True] * 3
    inference = processor(row.prompt, [image])["pixel_values"]
    assert prepared.pixels.shape == (5, 3, 64, 64) and torch.equal(prepared.pixels, inference)


def test_too_long_rows_are_skipped_and_named_bad_images_raised() -> None:
    vlm = tinyvlm.build_vlm("test-vlm")
    short, long = record(0), record(1, answer="red " * 40)
    limit = len(SampleMaker(vlm.processor, max_length=None)[short].example)
    maker = SampleMaker(vlm.processor, max_length=limit)
    collator = Collator(pad_id=0, packed=False, max_length=limit)
    micro = collator([maker[short], maker[long]])
    assert micro.batch.num_samples == 1 and micro.skipped == ["rows row 1"]
    assert collator([maker[long]]).batch is None
    broken = Record(short.messages, (EncodedImage(b"not a picture"),), "rows row 9")
    with pytest.raises(DataError, match=r"^rows row 9: cannot read image"):
        list(load([[short], [broken]], maker, collator, workers=0, prefetch_factor=2, pin_memory=False))


def test_two_workers_give_the_micro_batches_of_none() -> None:
    vlm = tinyvlm.build_vlm("test-vlm")
    maker = SampleMaker(vlm.processor, max_length=None)
    collator = Collator(pad_id=vlm.processor.pad_token_id, packed=True, max_length=200)
    lists = [[record(i), record(i + 1, size=(20 + i, 30))] for i in range(0, 12, 2)]
    alone = list(load(lists, maker, collator, workers=0, prefetch_factor=2, pin_memory=False))
    workers = list(load(iter(lists), maker, collator, workers=2, prefetch_factor=2, pin_memory=False))
    assert len(alone) == len(workers) == 6
    for a, b in zip(alone, workers):
        assert torch.equal(a.batch.input_ids, b.batch.input_ids) and torch.equal(a.batch.pixel_values, b.batch.pixel_values)
