"""nanoVLM checkpoints against nanoVLM's math on the same weights.

nanoVLM's code is not installed (not a package); the reference is its model reimplemented from its
published layout in ``nanovlm_reference.py`` (same module names, hence the same safetensors keys, written
with ``safetensors.torch.save_model`` as nanoVLM does). The tiny checkpoint is loaded with
``tinyvlm.load_vlm("local-dir:...")``: logits within 1e-5 (relative), identical greedy tokens, and the
pixels / token layout nanoVLM's processing gives (re-computed here: its ``Resize((S, S))`` on a PIL image is
PIL's bilinear resize, ``ToTensor`` divides by 255)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from twins import write_nanovlm_twin  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.errors import ConfigError, WeightsError  # noqa: E402

VARIANTS = {
    "v0.1-tied": dict(image_token=None, tied=True),
    "v0.1-untied": dict(image_token=None, tied=False),
    "image-token": dict(image_token="<|image|>", tied=True),
}


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _nanovlm_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """nanoVLM's ``transforms.Compose([Resize((size, size)), ToTensor()])`` on a PIL image."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(resized / 255.0).permute(2, 0, 1)[None]


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def twin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("nanovlm") / request.param
    reference = write_nanovlm_twin(folder, **VARIANTS[request.param])
    return folder, reference, tinyvlm.load_vlm(f"local-dir:{folder}"), VARIANTS[request.param]["image_token"]


def test_logits_pixels_and_greedy_tokens_match_nanovlm(twin) -> None:
    folder, reference, vlm, image_token = twin
    config = json.loads((folder / "config.json").read_text())
    image = _image(40, 70, seed=1)
    per_image = (config["vit_img_size"] // config["vit_patch_size"] // config["mp_pixel_shuffle_factor"]) ** 2
    if image_token is None:  # v0.1: a string prompt is the question, as nanoVLM v0.1's generate.py takes it
        prompt = "What colour is the shape?"
        text_ids = nanovlm_v01_ids(folder, f"Question: {prompt} Answer:")
        reference_ids = torch.tensor([text_ids])
    else:  # the image tokens inside nanoVLM's chat template
        prompt = [{"role": "user", "content": "What colour is the shape?"}]
        text = vlm.tokenizer.apply_chat_template([{"role": "user", "content": image_token * per_image + "What colour is the shape?"}])
        reference_ids = torch.tensor([vlm.tokenizer.encode(text, add_special_tokens=False)])
    batch = vlm.processor(prompt, [image])
    pixels = _nanovlm_pixels(image, config["vit_img_size"])
    torch.testing.assert_close(batch["pixel_values"], pixels, rtol=0, atol=1e-6)
    ids = batch["input_ids"]
    if image_token is None:
        assert ids[0, :per_image].tolist() == [vlm.image_token_id] * per_image
        assert ids[0, per_image:].tolist() == text_ids
    else:
        assert ids.tolist() == reference_ids.tolist()

    with torch.no_grad():
        ref_logits = reference(reference_ids, pixels)
        logits = vlm(ids, batch["pixel_values"]).logits
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() <= 1e-5

    ref_new = reference.generate(reference_ids, pixels, max_new_tokens=8)
    with torch.no_grad():
        embeds = vlm.embed_inputs(ids, batch["pixel_values"])
        tokens = vlm.decoder.generate(ids, inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[])
    assert tokens[:, ids.shape[1] :].tolist() == ref_new.tolist()


def nanovlm_v01_ids(folder: Path, text: str) -> list[int]:
    """nanoVLM v0.1's tokenization (``generate.py``, ``VQACollator``: ``batch_encode_plus([text])``, which
    transformers 5 spells ``tokenizer([text])``): the fast tokenizer of ``lm_tokenizer`` on the whole text,
    special tokens as that tokenizer adds them."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(json.loads((folder / "config.json").read_text())["lm_tokenizer"])
    return tokenizer([text])["input_ids"][0]


def test_v01_string_prompts_and_training_turns_are_nanovlms_text(tmp_path: Path) -> None:
    """v0.1 was trained on ``Question: {q} Answer:{a}<eos>`` with the image first: a string prompt (the question)
    and a training conversation become exactly those tokens; ``raw=True`` takes the text as given."""
    folder = tmp_path / "v01"
    write_nanovlm_twin(folder)
    vlm = tinyvlm.load_vlm(f"local-dir:{folder}")
    image = _image(30, 40, seed=2)
    per_image = vlm.processor.tokens_per_view
    ids = vlm.processor("Which shape is it?", [image])["input_ids"][0].tolist()
    assert ids == [vlm.image_token_id] * per_image + nanovlm_v01_ids(folder, "Question: Which shape is it? Answer:")
    raw = vlm.processor("Question: Which shape is it? Answer:", [image], raw=True)["input_ids"][0].tolist()
    assert raw == ids
    conversation = [{"role": "user", "content": "<image>Which shape is it?"}, {"role": "assistant", "content": "a circle"}]
    input_ids, labels = vlm.processor.encode_example(conversation, [image])
    eos = vlm.tokenizer.eos_token
    assert input_ids[per_image:] == nanovlm_v01_ids(folder, f"Question: Which shape is it? Answer:a circle{eos}")
    answer = nanovlm_v01_ids(folder, f"a circle{eos}")
    assert [t for t in labels if t != -100] == answer and labels[-len(answer):] == answer
    with pytest.raises(ConfigError, match="trained on questions and answers only, not on system turns"):
        vlm.processor([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


def test_tied_head_stored_once_under_head(twin) -> None:
    """nanoVLM's save_pretrained (safetensors save_model) keeps a tied embedding as ``decoder.head.weight``."""
    from safetensors import safe_open

    folder, _, vlm, _ = twin
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    tied = json.loads((folder / "config.json").read_text())["lm_tie_weights"]
    assert ("decoder.token_embedding.weight" in keys) == (not tied)
    assert (vlm.decoder.lm_head is None) == tied


def test_zoo_entry() -> None:
    spec = tinyvlm.get_spec("lusxvr-nanovlm-222m")
    assert spec.trained and spec.family == "nanovlm" and spec.hub_repo == "lusxvr/nanoVLM-222M"
    assert spec.params == 222_081_600  # SigLIP-B/16-224 85,797,120 + SmolLM2-135M 134,515,008 + MP 1,769,472


def test_image_splitting_checkpoints_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "split"
    write_nanovlm_twin(folder, image_token="<|image|>")
    config = json.loads((folder / "config.json").read_text())
    config["vlm_extra_tokens"] = {"image_token": "<|image|>", "global_image_token": "<|global_image|>", "r1c1": "<row_1_col_1>"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="image splitting"):
        tinyvlm.load_vlm(f"local-dir:{folder}")


def test_mismatched_checkpoint_is_a_weights_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    write_nanovlm_twin(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lm_n_blocks": 3}))
    with pytest.raises(WeightsError, match="missing"):
        tinyvlm.load_vlm(f"local-dir:{folder}")


# ------------------------------------------------------------------------ real layout facts (issue 10)


def test_file_holds_the_persistent_rope_buffer_and_loads(twin) -> None:
    """nanoVLM registers ``inv_freq`` as a persistent buffer, so ``save_model`` writes it; the loader declares it
    unused (tinyvlm recomputes it from ``lm_re_base``) instead of refusing it as unexpected."""
    from safetensors import safe_open

    folder, reference, vlm, _ = twin
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "decoder.rotary_embd.inv_freq" in handle.keys()
        stored = handle.get_tensor("decoder.rotary_embd.inv_freq")
    torch.testing.assert_close(vlm.decoder.rotary["default"].inv_freq, stored, rtol=0, atol=0)


def _publish_with_hub_tokenizer(hub, tmp_path: Path, repo: str, tokenizer_repo: str) -> Path:
    """A nanoVLM twin whose config.json names its tokenizer by Hub repo (as every published checkpoint does),
    served by the loopback Hub: the checkpoint under ``repo``, the tokenizer files alone under ``tokenizer_repo``."""
    folder = tmp_path / "nanovlm"
    write_nanovlm_twin(folder, lm_tokenizer=tokenizer_repo)
    hub.add_folder(tokenizer_repo, tmp_path / "nanovlm-tokenizer")  # tokenizer files only, no config.json
    hub.add_folder(repo, folder)
    return folder


def test_tokenizer_named_by_hub_repo_is_fetched_from_the_hub(hub, tmp_path: Path, offline_switch) -> None:
    folder = _publish_with_hub_tokenizer(hub, tmp_path, "someone/nano", "HuggingFaceTB/cosmo2-tokenizer")
    local = tinyvlm.load_vlm(f"local-dir:{folder}")
    from_hub = tinyvlm.load_vlm("hf-hub:someone/nano")
    paths = {path for _, path in hub.requests}
    assert any(path.startswith("/HuggingFaceTB/cosmo2-tokenizer/resolve/") for path in paths)
    assert local.tokenizer.encode("a red square") == from_hub.tokenizer.encode("a red square")
    batch = local.processor("What is it?", [_image(20, 30, seed=0)])
    with torch.no_grad():
        torch.testing.assert_close(
            from_hub(batch["input_ids"], batch["pixel_values"]).logits,
            local(batch["input_ids"], batch["pixel_values"]).logits, rtol=0, atol=0,
        )
    offline_switch()  # everything it needs is cached now
    hub.requests.clear()
    tinyvlm.load_vlm("hf-hub:someone/nano")
    assert hub.requests == []


def test_published_zoo_entry_loads_through_the_hub(hub, tmp_path: Path) -> None:
    """``lusxvr-nanovlm-222m`` (v0.1 layout, tokenizer HuggingFaceTB/cosmo2-tokenizer), served as a tiny twin
    under the real repo ids, loads by its zoo key and equals the same files loaded from disk."""
    folder = _publish_with_hub_tokenizer(hub, tmp_path, "lusxvr/nanoVLM-222M", "HuggingFaceTB/cosmo2-tokenizer")
    by_key = tinyvlm.load_vlm("lusxvr-nanovlm-222m")
    local = tinyvlm.load_vlm(f"local-dir:{folder}")
    image = _image(20, 30, seed=0)
    prompt = "What is it?"
    assert by_key.generate(prompt, images=[image], max_new_tokens=4) == local.generate(prompt, images=[image], max_new_tokens=4)
    batch = local.processor(prompt, [image])
    with torch.no_grad():
        torch.testing.assert_close(
            by_key(batch["input_ids"], batch["pixel_values"]).logits,
            local(batch["input_ids"], batch["pixel_values"]).logits, rtol=0, atol=0,
        )
