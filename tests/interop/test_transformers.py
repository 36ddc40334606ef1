"""Export to transformers (`tinyvlm.interop.transformers`): tiny twins built from the test entries, written with
``save_pretrained(layout="transformers")`` / ``tinyvlm export`` and read by transformers itself
(``AutoProcessor``, ``Idefics3ForConditionalGeneration``, ``AutoModelForCausalLM``): the same input ids, logits
within 1e-5 (relative max error, fp32), the same greedy tokens; and read back by tinyvlm unchanged."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))

from twins import write_smolvlm_twin  # noqa: E402

import tinyvlm  # noqa: E402
from tinyvlm.cli import main  # noqa: E402
from tinyvlm.errors import ConfigError  # noqa: E402
from tinyvlm.interop.transformers import save_idefics3  # noqa: E402
from tinyvlm.tokenizer import load_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

SMOLVLM_TOKENS = dict(token_layout="smolvlm", image_token="<image>", global_image_token="<global-img>")
#: (projector options, image-token options, decoder options) of tiny SigLIP + Llama + pixel-shuffle-linear VLMs.
TWINS = {
    "split-s2-tied": (dict(factor=2), dict(SMOLVLM_TOKENS, split_images=True, resize_longest_edge=128, max_grid=2), {}),
    "split-s4-untied": (dict(factor=4), dict(SMOLVLM_TOKENS, split_images=True, resize_longest_edge=192, max_grid=3),
                        dict(tie_word_embeddings=False)),
    "nosplit-s2": (dict(factor=2), dict(SMOLVLM_TOKENS, split_images=False, resize_longest_edge=128), {}),
}
IMAGE_SIZES = {"one": [(90, 50)], "square": [(64, 64)], "two": [(30, 140), (64, 20)], "text-only": []}


def spread_(module: torch.nn.Module, seed: int) -> None:
    """Weights at which every layer matters: matrices N(0, 1/fan_in), embeddings N(0, 1), norm weights
    1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "embed_tokens" in name:
                param.copy_(noise)
            elif param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=list(TWINS), ids=list(TWINS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    projector, tokens, decoder = TWINS[request.param]
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", "pixel-shuffle-linear", dtype=torch.float32,
                            projector_kwargs=projector, processor_kwargs=tokens, decoder_kwargs=decoder)
    spread_(vlm, 0)
    folder = vlm.save_pretrained(tmp_path_factory.mktemp(request.param) / "hf", layout="transformers")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return vlm, folder, processor, model


def reference_inputs(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=prompt, images=images or None, return_tensors="pt")


@pytest.mark.parametrize("sizes", list(IMAGE_SIZES.values()), ids=list(IMAGE_SIZES))
def test_transformers_gives_the_same_ids_and_logits(exported, sizes: list[tuple[int, int]]) -> None:
    vlm, folder, processor, model = exported
    images = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    expected = reference_inputs(processor, "What is in this image?", images)
    batch = vlm.processor("What is in this image?", images)
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    if images:
        assert (batch["input_ids"] == vlm.image_token_id).sum() > 0
        torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"][0], rtol=0, atol=1e-6)
    with torch.no_grad():
        reference = model(**expected).logits
        ours = vlm(batch["input_ids"], batch["pixel_values"]).logits
    vocab = ours.shape[-1]
    error = rel(ours, reference[..., :vocab])
    print(f"{folder.parent.name} {len(images)} image(s) {sizes}: max relative logit error {error:.2e}")
    assert error <= 1e-5
    assert torch.all(reference[..., vocab:] == 0)  # padded rows of the image token (suppressed in generation)

    eos = vlm.decoder.config.eos_token_ids
    ref_tokens = model.generate(**expected, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        embeds = vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
        tokens = vlm.decoder.generate(batch["input_ids"], inputs_embeds=embeds, max_new_tokens=8)
    assert tokens.tolist() == ref_tokens.tolist()
    assert model.generation_config.eos_token_id in (eos, eos[0])


def test_files_and_round_trip(exported) -> None:
    vlm, folder, processor, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "idefics3" and config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "idefics3_vision" and config["text_config"]["model_type"] == "llama"
    assert config["scale_factor"] == vlm.projector.factor and config["image_token_id"] == vlm.image_token_id
    assert processor.image_seq_len == vlm.processor.tokens_per_view
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == vlm.image_token_id
    tensors = load_file(str(folder / "model.safetensors"))
    assert "model.connector.modality_projection.proj.weight" in tensors
    assert ("lm_head.weight" in tensors) == (vlm.decoder.lm_head is not None)
    assert all(k.startswith(("model.vision_model.", "model.connector.", "model.text_model.", "lm_head.")) for k in tensors)

    back = tinyvlm.load_vlm(folder)
    images = [image(90, 50, seed=0)]
    batch = vlm.processor("Describe it.", images)
    assert back.processor("Describe it.", images)["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        ours, again = vlm(batch["input_ids"], batch["pixel_values"]).logits, back(batch["input_ids"], batch["pixel_values"]).logits
    assert torch.equal(again[..., : ours.shape[-1]], ours)
    assert back.generate("Describe it.", images, max_new_tokens=6) == vlm.generate("Describe it.", images, max_new_tokens=6)


def test_smolvlm_checkpoint_exports_back_to_its_own_layout(tmp_path: Path) -> None:
    """A VLM read from a SmolVLM (Idefics3) checkpoint exports to the same tensors and the same processing."""
    reference = write_smolvlm_twin(tmp_path / "twin", scale_factor=2)
    vlm = tinyvlm.load_vlm(tmp_path / "twin")
    folder = vlm.save_pretrained(tmp_path / "exported", layout="transformers")
    original, written = load_file(str(tmp_path / "twin" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)
    before, after = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "twin", folder))
    for key in ("image_token_id", "scale_factor", "tie_word_embeddings"):
        assert before[key] == after[key], key
    for key, value in before["vision_config"].items():
        if key not in ("attention_dropout", "initializer_range"):
            assert after["vision_config"][key] == value, key
    loaded = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    images = [image(60, 100, seed=4)]
    expected = reference_inputs(processor, "What is this?", images)
    assert vlm.processor("What is this?", images)["input_ids"].tolist() == expected["input_ids"].tolist()
    with torch.no_grad():
        assert rel(loaded(**expected).logits, reference(**expected).logits) <= 1e-5
    assert torch.equal(tinyvlm.load_vlm(folder).processor("What is this?", images)["input_ids"], expected["input_ids"])


# -------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("name", ["test-llama", "test-gemma3"])
def test_decoder_exports_as_a_plain_causal_lm(name: str, tmp_path: Path) -> None:
    decoder = tinyvlm.build_decoder(name, dtype=torch.float32)
    spread_(decoder, 1)
    if decoder.config.family == "gemma3":  # Gemma's norms scale by 1 + w
        with torch.no_grad():
            for param_name, param in decoder.named_parameters():
                if "norm" in param_name:
                    param.sub_(1.0)
    folder = decoder.save_pretrained(tmp_path / "hf", tokenizer=load_tokenizer(name))
    config = json.loads((folder / "config.json").read_text())
    expected_class = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}[decoder.config.family]
    assert config["architectures"] == [expected_class]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == expected_class
    ids = torch.randint(3, decoder.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))  # > Gemma's window
    with torch.no_grad():
        error = rel(decoder(ids).logits, model(ids).logits)
    print(f"{name}: max relative logit error {error:.2e}")
    assert error <= 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(name)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ours.apply_chat_template(messages)
    assert hf_tokenizer("Name a colour.").input_ids == ours.encode("Name a colour.")
    back = tinyvlm.build_decoder(f"local-dir:{folder}", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, decoder(ids).logits)
    assert back.config == decoder.config


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "test-llama", str(tmp_path / "llama")]) == 0
    assert "exported the decoder test-llama" in capsys.readouterr().out
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "llama" / "chat_template.jinja").is_file() and (tmp_path / "llama" / "tokenizer.json").is_file()

    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", "pixel-shuffle-linear", projector_kwargs=dict(factor=2),
                            processor_kwargs=SMOLVLM_TOKENS)
    saved = vlm.save_pretrained(tmp_path / "saved")
    assert main(["export", str(saved), str(tmp_path / "vlm")]) == 0
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["model_type"] == "idefics3"

    assert main(["export", "test-siglip", str(tmp_path / "encoder")]) == 1
    assert "is an encoder: export writes VLMs" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["export", "test-llama", str(tmp_path / "notes"), "--overwrite"]) == 1
    assert "not a saved model" in capsys.readouterr().err and (tmp_path / "notes" / "keep.txt").is_file()


def test_export_replaces_a_saved_model_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "llama"
    assert main(["export", "test-llama", str(folder)]) == 0
    (folder / "notes.txt").write_text("mine")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", "test-llama", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a saved model: pass overwrite=True (--overwrite" in err
    assert (folder / "notes.txt").is_file() and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["export", "test-llama", str(folder), "--overwrite"]) == 0
    assert not (folder / "notes.txt").exists() and (folder / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # written through a staging folder, renamed

    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", "pixel-shuffle-linear", projector_kwargs=dict(factor=2),
                            processor_kwargs=SMOLVLM_TOKENS)
    for layout in ("tinyvlm", "transformers"):
        saved = vlm.save_pretrained(tmp_path / layout, layout=layout)
        with pytest.raises(ConfigError, match="already holds a saved model: pass overwrite=True"):
            vlm.save_pretrained(saved, layout=layout)
        assert vlm.save_pretrained(saved, layout=layout, overwrite=True) == saved
    decoder = tinyvlm.build_decoder("test-llama")
    with pytest.raises(ConfigError, match="already holds a saved model"):
        decoder.save_pretrained(folder)
    decoder.save_pretrained(folder, overwrite=True)


def test_what_cannot_export_is_a_config_error(tmp_path: Path) -> None:
    cases = {
        "DINOv3": (dict(encoder="test-dinov3", projector="pixel-shuffle-linear", processor_kwargs=SMOLVLM_TOKENS),
                   "dinov3 encoder is not SigLIP"),
        "Gemma-3": (dict(decoder="test-gemma3", projector="pixel-shuffle-linear", processor_kwargs=SMOLVLM_TOKENS),
                    "gemma3 decoder is not a Llama"),
        "MLP projector": (dict(processor_kwargs=SMOLVLM_TOKENS), "is not pixel-shuffle-linear"),
        "nanoVLM layout": (dict(projector="pixel-shuffle-linear", processor_kwargs=dict(token_layout="nanovlm")),
                           "nanovlm token layout .* Idefics3Processor cannot write: build the VLM with processor_kwargs"),
    }
    for what, (options, message) in cases.items():
        options = {"encoder": "test-siglip", "decoder": "test-llama", "projector": "pixel-shuffle-mlp", **options}
        vlm = tinyvlm.build_vlm(options.pop("encoder"), options.pop("decoder"), options.pop("projector"), **options)
        with pytest.raises(ConfigError, match=message):
            save_idefics3(vlm, tmp_path / what)
        assert not (tmp_path / what).exists()
    with pytest.raises(ConfigError, match="smolvlm token layout writes SmolVLM's token strings .* token_layout='nanovlm'"):
        tinyvlm.build_vlm("test-siglip", "test-llama", processor_kwargs=dict(image_token="<|image|>"))

    from tinyvlm.interop.lora import add_lora
    from tinyvlm.interop.lora_settings import LoraSettings

    pytest.importorskip("peft")
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama", "pixel-shuffle-linear", processor_kwargs=SMOLVLM_TOKENS)
    with pytest.raises(ConfigError, match="LoRA adapter: merge it first"):
        save_idefics3(add_lora(vlm, LoraSettings(rank=2)), tmp_path / "lora")
