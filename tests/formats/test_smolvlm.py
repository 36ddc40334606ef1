"""SmolVLM / SmolVLM2 checkpoints against transformers on tiny random twins saved with ``save_pretrained``
in the Hub layout and loaded with ``tinyvlm.load_vlm("local-dir:...")``: same input_ids and pixel values
(via tinyvlm's processor), logits within 1e-5 (relative), identical greedy tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from twins import hf_processor, write_smolvlm_twin  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.errors import ConfigError  # noqa: E402

pytest.importorskip("transformers")

TWINS = {
    # (model_type, scale_factor, tied head, image splitting)
    "idefics3-s4-split": ("idefics3", 4, False, True),
    "smolvlm2-s2-tied-split": ("smolvlm", 2, True, True),
    "idefics3-s2-nosplit": ("idefics3", 2, False, False),
}


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=list(TWINS), ids=list(TWINS))
def twin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model_type, scale, tied, split = TWINS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_smolvlm_twin(
        folder, model_type=model_type, scale_factor=scale, tie_word_embeddings=tied, do_image_splitting=split
    )
    vlm = tinyvlm.load_vlm(f"local-dir:{folder}")
    return folder, reference, vlm


def _reference_inputs(folder: Path, text: str, images: list[Image.Image]):
    processor = hf_processor(folder)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=prompt, images=images, return_tensors="pt")


@pytest.mark.parametrize("sizes", [[(30, 50)], [(64, 20), (16, 16)]], ids=["one-image", "two-images"])
def test_logits_and_greedy_tokens_match_transformers(twin, sizes: list[tuple[int, int]]) -> None:
    folder, reference, vlm = twin
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    expected = _reference_inputs(folder, "What is in this image?", images)
    batch = vlm.processor("<image>" * len(images) + "What is in this image?", images)
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"][0], rtol=0, atol=1e-6)

    with torch.no_grad():
        ref_logits = reference(**expected).logits
        logits = vlm(batch["input_ids"], batch["pixel_values"]).logits
    assert _rel(logits, ref_logits) <= 1e-5

    eos = vlm.decoder.config.eos_token_ids
    ref_tokens = reference.generate(**expected, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=2)
    with torch.no_grad():
        embeds = vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
        tokens = vlm.decoder.generate(batch["input_ids"], inputs_embeds=embeds, max_new_tokens=8)
    assert tokens.tolist() == ref_tokens.tolist()
    answer = vlm.generate("<image>" * len(images) + "What is in this image?", images, max_new_tokens=8)
    prompt_len = expected["input_ids"].shape[1]
    assert answer == vlm.tokenizer.decode(
        [t for t in ref_tokens[0, prompt_len:].tolist() if t not in eos], skip_special_tokens=True
    )


def test_text_only_prompt_matches_transformers(twin) -> None:
    folder, reference, vlm = twin
    processor = hf_processor(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}], add_generation_prompt=True
    )
    expected = processor(text=prompt, return_tensors="pt")
    batch = vlm.processor("Name three colours.")
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    with torch.no_grad():
        assert _rel(vlm(batch["input_ids"]).logits, reference(**expected).logits) <= 1e-5


def test_connector_order_is_idefics3s(twin) -> None:
    """tinyvlm's projector equals transformers' connector on the same features (pixel-shuffle channel order)."""
    _, reference, vlm = twin
    side = vlm.image_grid[0]
    features = torch.randn(3, side * side, vlm.encoder.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vlm.projector(features, (side, side)), reference.model.connector(features))


def test_loaded_config_and_bf16(twin, tmp_path: Path) -> None:
    folder, _, vlm = twin
    hf = json.loads((folder / "config.json").read_text())
    assert vlm.image_token_id == hf["image_token_id"]
    assert vlm.decoder.config.eos_token_ids == [vlm.tokenizer.token_to_id("<end_of_utterance>")]
    assert vlm.config.image_tokens.token_layout == "smolvlm"
    half = tinyvlm.load_vlm(f"local-dir:{folder}", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_unsupported_preprocessing_is_refused(tmp_path: Path) -> None:
    write_smolvlm_twin(tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "resample": 3}))
    with pytest.raises(ConfigError, match="resample=3"):
        tinyvlm.load_vlm(f"local-dir:{tmp_path}")


def test_zoo_entries_are_trained_smolvlm() -> None:
    keys = {"smolvlm-256m-instruct", "smolvlm-500m-instruct", "smolvlm2-256m-video-instruct"}
    specs = {spec.key: spec for spec in tinyvlm.list_models(kind="vlm")}
    assert keys <= set(specs)
    for key in keys:
        assert specs[key].trained and specs[key].family == "smolvlm" and specs[key].hub_repo.startswith("HuggingFaceTB/")
    # SmolVLM-256M-Instruct: 256,484,928 parameters in its safetensors file (471 tensors, untied head)
    assert specs["smolvlm-256m-instruct"].params == 256_484_928


def test_build_vlm_on_a_trained_entry_says_load_vlm() -> None:
    with pytest.raises(ConfigError, match="load_vlm"):
        tinyvlm.build_vlm("smolvlm-256m-instruct")


def test_zoo_key_hf_hub_and_cli_generate_through_the_hub(hub, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The zoo entry and ``hf-hub:`` download the repo's files (a twin served under the real repo id) and give
    the same model; ``tinyvlm generate --model smolvlm-256m-instruct`` answers as ``vlm.generate``."""
    from tinyvlm.cli import main

    folder = tmp_path / "repo"
    write_smolvlm_twin(folder)
    hub.add_folder("HuggingFaceTB/SmolVLM-256M-Instruct", folder)
    by_key = tinyvlm.load_vlm("smolvlm-256m-instruct")
    by_repo = tinyvlm.load_vlm("hf-hub:HuggingFaceTB/SmolVLM-256M-Instruct")
    image_path = tmp_path / "image.png"
    _image(30, 50, seed=3).save(image_path)
    expected = by_key.generate("<image>What is this?", [str(image_path)], max_new_tokens=6)
    assert by_repo.generate("<image>What is this?", [str(image_path)], max_new_tokens=6) == expected
    code = main(["generate", "--model", "smolvlm-256m-instruct", "--image", str(image_path),
                 "--prompt", "<image>What is this?", "--max-new-tokens", "6"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_processor_files_written_by_transformers_5(tmp_path: Path) -> None:
    """transformers 5 nests the image processor's settings in processor_config.json (no preprocessor_config.json)
    and writes chat_template.jinja: the splitting settings still come from the checkpoint, and ids and logits
    still equal transformers'."""
    from twins import hf_processor, resave_processor_with_transformers

    reference = write_smolvlm_twin(tmp_path, do_image_splitting=False)
    processor = hf_processor(tmp_path)
    resave_processor_with_transformers(tmp_path)
    vlm = tinyvlm.load_vlm(f"local-dir:{tmp_path}")
    assert not vlm.config.image_tokens.split_images  # read from processor_config.json's image_processor
    image = _image(70, 40, seed=5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    expected = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[[image]],
                         return_tensors="pt")
    batch = vlm.processor([{"role": "user", "content": "<image>What is this?"}], [image])
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    with torch.no_grad():
        ours = vlm(batch["input_ids"], batch["pixel_values"]).logits
        theirs = reference(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
