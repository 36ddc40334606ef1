"""DINOv3 against transformers' DINOv3ViTModel on tiny random twins saved with ``save_pretrained``
(``layer.{i}`` on disk, ``mask_token`` in the file) and loaded through ``local-dir:``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from encoder_twins import randomize_, rel_err
from safetensors.torch import load_file, save_file

import tinyvlm
from tinyvlm.encoders.dinov3 import DINOv3Config, rope_2d
from tinyvlm.errors import ConfigError, WeightsError

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4,
            image_size=32, patch_size=8)
VARIANTS = {
    "plain": dict(),
    "gated": dict(use_gated_mlp=True, hidden_act="silu"),
    "key-bias": dict(key_bias=True, layer_norm_eps=1e-6),
}
#: square at the training size, non-square, and sizes other than the training one
SIZES = [(32, 32), (48, 64), (24, 40), (64, 16)]


def _twin(folder: Path, variant: str, seed: int) -> torch.nn.Module:
    config = transformers.DINOv3ViTConfig(**TINY, **VARIANTS[variant])
    model = transformers.DINOv3ViTModel._from_config(config, attn_implementation="eager")
    randomize_(model, seed=seed).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def twin(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp(f"dinov3-{request.param}")
    return folder, _twin(folder, request.param, seed=len(request.param))


def _reference(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    assert model.config._attn_implementation == "eager" and not model.training
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state[:, 1 + model.config.num_register_tokens :]


def test_on_disk_layout(twin):
    folder, _ = twin
    keys = set(load_file(folder / "model.safetensors"))
    assert "layer.0.norm1.weight" in keys and "embeddings.mask_token" in keys
    assert not any(key.startswith("model.") for key in keys)


@pytest.mark.parametrize("size", SIZES)
def test_parity(twin, size):
    folder, reference = twin
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}")
    assert encoder.num_prefix_tokens == 5
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = encoder(pixels)
    expected = _reference(reference, pixels)
    assert ours.shape == expected.shape == (2, (size[0] // 8) * (size[1] // 8), 32)
    assert rel_err(ours, expected) <= 1e-5


def test_train_mode_is_deterministic(twin):
    """tinyvlm never augments the RoPE coordinates: train mode computes the eval-mode function."""
    folder, reference = twin
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}").train()
    pixels = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        assert rel_err(encoder(pixels), _reference(reference, pixels)) <= 1e-5


def test_bf16(twin):
    folder, reference = twin
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}", dtype=torch.bfloat16)
    pixels = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        ours = encoder(pixels)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, _reference(reference, pixels)) < 5e-2


def test_tokens_and_layerscale_matter(twin):
    """CLS / register tokens and LayerScale are loaded and used (guards against a vacuous parity)."""
    folder, _ = twin
    encoder = tinyvlm.build_encoder(f"local-dir:{folder}")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = encoder(pixels)
        encoder.embeddings.register_tokens.zero_()
        after_registers = encoder(pixels)
        encoder.layers[0].layer_scale2.lambda1.fill_(1.0)
        after_layerscale = encoder(pixels)
    assert rel_err(after_registers, before) > 1e-3
    assert rel_err(after_layerscale, after_registers) > 1e-3


def test_rope_table():
    """Patch centres normalised per axis, angles [y-block, x-block] tiled twice, identity for the prefix."""
    cos, sin = rope_2d(2, 4, head_dim=8, theta=100.0, prefix=1, device=torch.device("cpu"))
    assert cos.shape == sin.shape == (1 + 8, 8)
    assert (cos[0] == 1).all() and (sin[0] == 0).all()
    inv_freq = torch.tensor([1.0, 0.1])  # 100 ** -(0, 0.5)
    y, x = -0.5, -0.75  # the first patch of a 2 x 4 grid
    angles = 2 * torch.pi * torch.cat([y * inv_freq, x * inv_freq])
    torch.testing.assert_close(sin[1], torch.cat([angles, angles]).sin())


def test_weights_error(twin, tmp_path):
    folder, _ = twin
    weights = load_file(folder / "model.safetensors")
    del weights["embeddings.register_tokens"]
    weights["layer.1.attention.extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"(?s)missing.*register_tokens.*unexpected.*layer\.1\.attention\.extra"):
        tinyvlm.build_encoder(f"local-dir:{tmp_path}")


def test_contract():
    encoder = tinyvlm.build_encoder("test-dinov3")
    assert (encoder.dim, encoder.patch_size, encoder.image_size, encoder.num_prefix_tokens) == (64, 8, 64, 5)
    assert encoder.grid_size(48, 80) == (6, 10)
    assert encoder(torch.randn(2, 3, 48, 80)).shape == (2, 60, 64)
    with pytest.raises(ConfigError, match="multiples of 8"):
        encoder(torch.randn(1, 3, 50, 64))


def test_from_hf():
    hf = transformers.DINOv3ViTConfig(**TINY, **VARIANTS["gated"]).to_dict()
    config = DINOv3Config.from_hf(hf)
    assert config == DINOv3Config(**TINY, **VARIANTS["gated"])
    # transformers' default is no registers (ours is 4, as every released checkpoint)
    assert DINOv3Config.from_hf({"model_type": "dinov3_vit"}).num_register_tokens == 0


@pytest.mark.parametrize("change", [{"query_bias": False}, {"mlp_bias": False}, {"num_channels": 4},
                                    {"patch_size": [16, 8]}, {"model_type": "dinov2"}])
def test_from_hf_refuses_what_it_does_not_implement(change):
    with pytest.raises(ConfigError):
        DINOv3Config.from_hf({**transformers.DINOv3ViTConfig(**TINY).to_dict(), **change})
