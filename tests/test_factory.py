"""`build_encoder` / `build_decoder` / `part_config` on the test-only tiny family: name forms, overrides,
random init, dtype, and kind checks."""

from __future__ import annotations

import pytest
import torch
from tiny_family import TinyConfig, TinyModule, checkpoint_tensors, write_checkpoint

from tinyvlm.errors import ConfigError, UnknownModelError
from tinyvlm.api import build_decoder, build_encoder, part_config
from tinyvlm.sources import resolve


def test_random_init_entry_with_overrides(tiny_zoo):
    tiny_zoo("test-tiny")
    torch.manual_seed(0)
    module = build_encoder("test-tiny", dim=4, hidden=6)
    assert isinstance(module, TinyModule) and module.dim == 4 and module.fc.weight.shape == (6, 4)
    assert not module.training
    torch.manual_seed(0)
    again = build_encoder("test-tiny", dim=4, hidden=6)
    assert torch.equal(module.fc.weight, again.fc.weight)


def test_unknown_override_names_it_and_the_valid_fields(tiny_zoo):
    tiny_zoo("test-tiny")
    with pytest.raises(ConfigError, match=r"unknown TinyConfig field\(s\): width. Valid fields: dim, hidden"):
        build_encoder("test-tiny", width=3)
    with pytest.raises(ConfigError, match=r"dim: Input should be a multiple of 2"):
        build_encoder("test-tiny", dim=3)


def test_dtype_and_device(tiny_zoo, tmp_path):
    tiny_zoo("test-tiny")
    assert build_encoder("test-tiny", dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16
    write_checkpoint(tmp_path / "ckpt")
    loaded = build_encoder(f"local-dir:{tmp_path / 'ckpt'}", dtype=torch.bfloat16, device="cpu")
    assert loaded.fc.weight.dtype == torch.bfloat16 and loaded.fc.weight.device.type == "cpu"
    assert torch.equal(loaded.fc.weight, checkpoint_tensors(TinyConfig())["model.fc.weight"].bfloat16())


def test_local_dir_pretrained_false_reads_config_only(tiny_zoo, tmp_path):
    write_checkpoint(tmp_path / "ckpt", TinyConfig(dim=6, hidden=10))
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    module = build_encoder(f"local-dir:{tmp_path / 'ckpt'}", pretrained=False)
    assert module.dim == 6


def test_local_dir_overrides_that_break_the_weights(tiny_zoo, tmp_path):
    from tinyvlm.errors import WeightsError

    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_encoder(f"local-dir:{tmp_path / 'ckpt'}", hidden=12)


def test_kind_is_checked(tiny_zoo, tmp_path):
    tiny_zoo("test-tiny")
    with pytest.raises(UnknownModelError, match="'test-tiny' is an encoder, not a decoder. Pass it where an encoder is expected"):
        build_decoder("test-tiny")
    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"config.json describes an encoder \(tiny family\), not a decoder"):
        build_decoder(f"local-dir:{tmp_path / 'ckpt'}")


def test_config_without_model_type(tiny_zoo, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json has no model_type, which is not a supported encoder family"):
        part_config("encoder", resolve(f"local-dir:{tmp_path}"), {})
