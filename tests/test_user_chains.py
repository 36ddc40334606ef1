"""The chain a user walks with the command line and its defaults, end to end: ``train`` (a SigLIP + Llama pair,
or the ``test-vlm`` recipe) -> ``eval`` -> ``train --lora`` -> ``merge`` -> ``export`` -> transformers runs the
export (same input ids, logits within 1e-5, same greedy tokens) -> one request through the server. Every name
after the first ``train`` is a run folder, as a user writes it. A model that cannot export says so when
``train`` starts."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tinyvlm
from tinyvlm.cli import main
from tinyvlm.demo import make_shapes_dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

#: How each chain names its model on the first ``train``: nothing but the names.
STARTS = {"siglip+llama": ["--encoder", "test-siglip", "--decoder", "test-llama"], "test-vlm": ["--model", "test-vlm"]}
SHORT = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--eval-samples", "0", "--checkpoint-every",
         "0", "--no-progress"]  # fmt: skip
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=16, seed=0)


def reference_inputs(processor, text: str, image: Image.Image):
    """What a transformers user feeds the exported model: its processor's chat template and image processing."""
    content = [{"type": "image"}, {"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=prompt, images=[image], return_tensors="pt")


def served_answer(vlm, image: Image.Image) -> str:
    """One chat completion through the server app (the engine thread runs while the client is open)."""
    from fastapi.testclient import TestClient

    from tinyvlm.serve.app import create_app

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    request = {"model": "chain", "messages": [{"role": "user", "content": content}], "max_tokens": 6}
    with TestClient(create_app(vlm, "chain")) as client:
        reply = client.post("/v1/chat/completions", json=request)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("start", list(STARTS))
def test_train_eval_lora_merge_export_serve_with_the_defaults(start: str, data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run, lora, merged, hf = (tmp_path / name for name in ("run", "lora", "merged", "hf"))
    assert main(["train", *STARTS[start], "--data", str(data), "--output", str(run), *SHORT]) == 0
    assert "will not export" not in capsys.readouterr().err
    trained = tinyvlm.load_vlm(run)
    assert trained.config.projector == "pixel-shuffle-linear" and trained.config.image_tokens.token_layout == "smolvlm"

    assert main(["eval", "--model", str(run), "--task", "exact_match", "--data", str(data), "--limit", "4"]) == 0
    assert "exact_match" in capsys.readouterr().out
    assert main(["train", "--model", str(run), "--lora", "2", "--data", str(data), "--output", str(lora), *SHORT]) == 0
    assert main(["merge", str(run), str(lora), str(merged)]) == 0
    assert main(["export", str(merged), str(hf)]) == 0, capsys.readouterr().err
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Idefics3ForConditionalGeneration"]

    vlm = tinyvlm.load_vlm(merged)
    processor = transformers.AutoProcessor.from_pretrained(hf)
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    image = Image.open(data.parent / "images" / "00000.png").convert("RGB")
    expected = reference_inputs(processor, QUESTION, image)
    batch = vlm.processor(QUESTION, [image])
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    with torch.no_grad():
        reference = model(**expected).logits
        ours = vlm(batch["input_ids"], batch["pixel_values"]).logits
    vocab = ours.shape[-1]
    assert ((ours - reference[..., :vocab]).abs().max() / reference.abs().max()).item() <= 1e-5
    ref_tokens = model.generate(**expected, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        tokens = vlm.decoder.generate(batch["input_ids"], inputs_embeds=vlm.embed_inputs(batch["input_ids"],
                                      batch["pixel_values"]), max_new_tokens=6)  # fmt: skip
    assert tokens.tolist() == ref_tokens.tolist()

    served = tinyvlm.load_vlm(str(merged))  # what tinyvlm serve --model MERGED serves
    assert served_answer(served, image) == vlm.generate(QUESTION, [image], max_new_tokens=6)


@pytest.mark.parametrize(
    "options, reasons",
    [
        (["--encoder", "test-dinov3", "--decoder", "test-gemma3"], ["dinov3 encoder is not SigLIP", "gemma3 decoder is not a Llama"]),
        (["--encoder", "test-siglip", "--decoder", "test-llama", "--projector", "pixel-shuffle-mlp"], ["is not pixel-shuffle-linear"]),
        (["--encoder", "test-siglip", "--decoder", "test-llama", "--image-token-layout", "nanovlm"],
         ["nanovlm token layout", "--image-token-layout smolvlm"]),
    ],
    ids=["dinov3+gemma3", "mlp-projector", "nanovlm-layout"],
)
def test_train_says_at_the_start_when_its_model_will_not_export(options: list[str], reasons: list[str], data: Path,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    short = [*SHORT[:1], "1", *SHORT[2:]]  # one step
    assert main(["train", *options, "--data", str(data), "--output", str(tmp_path / "run"), *short]) == 0
    lines = capsys.readouterr().err.splitlines()
    said = [line for line in lines if "will not export" in line]
    assert len(said) == 1 and said[0].startswith("this model will not export to transformers: ")
    assert lines.index(said[0]) < next(i for i, line in enumerate(lines) if line.startswith("step "))  # before training
    assert all(reason in said[0] for reason in reasons)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 1


def test_the_layout_flag_goes_with_a_pair(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--model", "test-vlm", "--image-token-layout", "nanovlm", "--data", str(data),
                 "--output", str(tmp_path / "run"), *SHORT]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_token_layout goes with encoder + decoder" in err.replace("-", "_")
