"""SigLIP / SigLIP2 vision tower against transformers' SiglipModel / SiglipVisionModel on tiny random twins.

The twins are saved with ``save_pretrained`` (the official layouts) and loaded through tinyvlm's own loader
(``local-dir:``). The tiny config mirrors so400m's quirk: 36 px images with 8 px patches, so the conv drops
the last 4 px, and a 4x4 position table that other input sizes interpolate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from encoder_twins import randomize_, rel_err
from safetensors.torch import load_file, save_file

import tinyvlm
from tinyvlm.encoders.siglip import SiglipConfig, SiglipEncoder
from tinyvlm.errors import ConfigError, WeightsError

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=36, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: (height, width): the training size (36 -> 4x4 grid), an exact multiple, bigger and non-square (interpolated).
SIZES = [(36, 36), (32, 32), (48, 48), (40, 56), (24, 64)]


@pytest.fixture(scope="module")
def dual_tower(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A full SiglipModel twin (vision + text towers + logit scalars), as the Hub files are."""
    config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
    model = transformers.SiglipModel._from_config(config, attn_implementation="eager")
    randomize_(model, seed=0).eval()
    folder = tmp_path_factory.mktemp("siglip-dual")
    model.save_pretrained(folder)
    return folder, model.vision_model


def _reference(vision_model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    assert vision_model.config._attn_implementation == "eager"
    with torch.no_grad():
        return vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state


@pytest.mark.parametrize("size", SIZES)
def test_dual_tower_parity(dual_tower, size):
    folder, reference = dual_tower
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}")
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = encoder(pixels)
    expected = _reference(reference, pixels)
    assert ours.shape == expected.shape == (2, (size[0] // 8) * (size[1] // 8), 32)
    assert rel_err(ours, expected) <= 1e-5


def test_training_size_needs_no_interpolation(dual_tower):
    """At the training size the reference's default path (no interpolation) gives the same tokens."""
    folder, reference = dual_tower
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}")
    pixels = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        assert rel_err(encoder(pixels), expected) <= 1e-5


def test_positions_matter(dual_tower):
    """The position table is loaded: zeroing it changes the output (guards against a vacuous parity)."""
    folder, _ = dual_tower
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}")
    pixels = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        before = encoder(pixels)
        encoder.embeddings.position_embedding.weight.zero_()
        assert rel_err(encoder(pixels), before) > 1e-2


@pytest.mark.parametrize("prefixed", [False, True], ids=["v5-unprefixed", "v4-prefixed"])
def test_vision_only_layouts(tmp_path, prefixed):
    config = transformers.SiglipVisionConfig(**VISION)
    model = transformers.SiglipVisionModel._from_config(config, attn_implementation="eager")
    randomize_(model, seed=2).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(key.startswith("head.") for key in weights)  # the pooling head is in the file, declared unused
    assert not any(key.startswith("vision_model.") for key in weights)
    if prefixed:  # transformers v4 wrote vision-only files with the prefix
        save_file({f"vision_model.{k}": v for k, v in weights.items()}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip_vision_model"
    encoder = tinyvlm.build_encoder(f"local-dir:{tmp_path}")
    for size in [(36, 36), (40, 56)]:
        pixels = torch.randn(2, 3, *size)
        assert rel_err(encoder(pixels).detach(), _reference(model, pixels)) <= 1e-5


def test_bf16(dual_tower):
    folder, reference = dual_tower
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ours = encoder(pixels)  # fp32 input is cast to the weights' dtype
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, _reference(reference, pixels)) < 5e-2


def test_weights_error_lists_missing_and_unexpected(dual_tower, tmp_path):
    folder, _ = dual_tower
    weights = load_file(folder / "model.safetensors")
    del weights["vision_model.post_layernorm.bias"]
    weights["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError) as error:
        tinyvlm.build_encoder(f"local-dir:{tmp_path}")
    message = str(error.value)
    assert "missing" in message and "post_layernorm.bias" in message
    assert "unexpected" in message and "layers.0.self_attn.extra.weight" in message


def test_contract():
    encoder = tinyvlm.build_encoder("test-siglip")
    assert isinstance(encoder, tinyvlm.encoders.Encoder)
    assert (encoder.dim, encoder.patch_size, encoder.image_size, encoder.num_prefix_tokens) == (64, 8, 64, 0)
    assert encoder.grid_size(64, 64) == (8, 8) and encoder.grid_size(70, 90) == (8, 11)
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 64, 64)
    assert encoder(torch.randn(1, 3, 70, 90)).shape == (1, 88, 64)


# ------------------------------------------------------------------------------------------ config.json


def _hf_dual(vision: dict, vocab: int) -> dict:
    text = {**TEXT, "vocab_size": vocab}
    return transformers.SiglipConfig(vision_config=vision, text_config=text).to_dict()


def test_from_hf_dual_and_vision_only():
    dual = SiglipConfig.from_hf(_hf_dual(VISION, 32000))
    vision_only = SiglipConfig.from_hf(transformers.SiglipVisionConfig(**VISION).to_dict())
    assert dual == vision_only == SiglipConfig(**VISION, resample="bicubic")


def test_from_hf_siglip2_is_bilinear():
    """SigLIP2 fixed-res files are ``model_type: siglip``; their 256k Gemma vocabulary selects bilinear."""
    assert SiglipConfig.from_hf(_hf_dual(VISION, 256000)).resample == "bilinear"


def test_from_hf_minimal_defaults():
    """A config.json with only the non-default fields (as the so400m file) takes transformers' defaults."""
    config = SiglipConfig.from_hf({"model_type": "siglip", "vision_config": {"image_size": 384, "patch_size": 14}})
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (768, 12, "gelu_pytorch_tanh")


@pytest.mark.parametrize(
    "change", [{"num_channels": 1}, {"patch_size": [16, 8]}, {"hidden_act": "quick_gelu"}, {"hidden_size": 30}]
)
def test_from_hf_refuses_what_it_does_not_implement(change):
    with pytest.raises(ConfigError):
        SiglipConfig.from_hf({"model_type": "siglip_vision_model", **VISION, **change})


def test_from_hf_refuses_other_model_types():
    with pytest.raises(ConfigError, match="siglip"):
        SiglipConfig.from_hf({"model_type": "siglip2"})


def test_build_on_meta_then_random_init_is_finite():
    with torch.device("meta"):
        meta = SiglipEncoder(tinyvlm.get_spec("test-siglip").config)
    assert all(p.is_meta for p in meta.parameters())
    out = tinyvlm.build_encoder("test-siglip", dtype=torch.bfloat16)(torch.randn(1, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
