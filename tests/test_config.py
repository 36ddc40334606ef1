"""`tinyvlm.config.Config`: strict fields, validated `replace`, readable errors, JSON round trip."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
from pydantic import Field

from tinyvlm.config import Config, require
from tinyvlm.errors import ConfigError


class Example(Config):
    family: ClassVar[str] = "example"
    width: int = Field(64, ge=1)
    act: Literal["gelu", "silu"] = "gelu"
    eps: float = 1e-6
    layers: tuple[int, ...] = (1, 2)


def test_unknown_field_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        Example.validate_dict({"width": 8, "widht": 9}, context="my-model")
    assert str(error.value) == (
        "my-model: invalid Example: unknown field 'widht' (valid fields: act, eps, layers, width)"
    )


def test_bad_values_name_the_field_and_the_input():
    with pytest.raises(ConfigError) as error:
        Example.validate_dict({"width": 0, "act": "relu"})
    message = str(error.value)
    assert message.startswith("invalid Example: ")
    assert "width: Input should be greater than or equal to 1 (got 0)" in message
    assert "act: Input should be 'gelu' or 'silu' (got 'relu')" in message


def test_replace_validates():
    config = Example()
    assert config.replace(width=8, act="silu") == Example(width=8, act="silu")
    assert config == Example()  # unchanged
    with pytest.raises(ConfigError, match=r"unknown Example field\(s\): depth, wdth. Valid fields: act, eps, layers, width"):
        config.replace(wdth=8, depth=2)
    with pytest.raises(ConfigError, match=r"width: Input should be greater than or equal to 1 \(got -1\)"):
        config.replace(width=-1)
    with pytest.raises(ConfigError, match=r"width: Input should be a valid integer"):
        config.replace(width="wide")


def test_frozen():
    with pytest.raises(Exception, match="frozen"):
        Example().width = 3


def test_json_round_trip():
    config = Example(width=5, act="silu", eps=1e-5, layers=(3, 4, 5))
    assert Example.model_validate_json(config.to_json()) == config
    assert Example.validate_dict(config.model_dump(mode="json")) == config


def test_from_hf_must_be_overridden():
    with pytest.raises(ConfigError, match="the example family does not read Hugging Face config.json"):
        Example.from_hf({"model_type": "x"})


def test_require():
    require({"hidden_act": "gelu"}, "hidden_act", "gelu", family="example")
    require({}, "hidden_act", "gelu", family="example")  # absent means the default
    with pytest.raises(ConfigError, match=r"example checkpoint has hidden_act='relu'; tinyvlm implements only hidden_act='gelu'"):
        require({"hidden_act": "relu"}, "hidden_act", "gelu", family="example")


# ------------------------------------------------------------------ every config path validates (issue 10)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hidden_size": -3}, r"hidden_size: Input should be greater than or equal to 1 \(got -3\)"),
        ({"rms_norm_eps": -1.0}, r"rms_norm_eps: Input should be greater than 0"),
        ({"hidden_act": "gelu_fast"}, r"unsupported activation 'gelu_fast'"),
        ({"num_kv_heads": 3}, r"num_heads 4 is not a multiple of num_kv_heads 3"),
        ({"eos_token_ids": [9999]}, r"eos_token_ids 9999 is outside the vocabulary of 512 tokens"),
    ],
)
def test_decoder_overrides_are_validated(override, message):
    import tinyvlm

    with pytest.raises(ConfigError, match=message):
        tinyvlm.build_decoder("test-llama", pretrained=False, **override)


def test_configs_built_directly_raise_config_errors():
    from tinyvlm.decoders.gemma3 import Gemma3Config
    from tinyvlm.encoders.siglip import SiglipConfig
    from tinyvlm.layers import RopeConfig

    good = tinyvlm_spec_config("test-gemma3").model_dump()
    with pytest.raises(ConfigError, match=r"4 layer_types for 3 layers"):
        Gemma3Config(**{**good, "num_layers": 3})  # test-gemma3 has 4 layers
    with pytest.raises(ConfigError, match=r"sliding_window"):
        Gemma3Config(**{**good, "sliding_window": 0})
    with pytest.raises(ConfigError, match=r"hidden_size 30 is not divisible by num_attention_heads"):
        SiglipConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"theta: Input should be greater than 0"):
        RopeConfig(theta=0)
    from tinyvlm.decoders.llama import LlamaConfig

    with pytest.raises(ConfigError, match=r"hidden_act: unsupported activation 'gelu_fast'"):
        LlamaConfig(**{**tinyvlm_spec_config("test-llama").model_dump(), "hidden_act": "gelu_fast"})


def test_head_dim_is_derived_once():
    from tinyvlm.decoders.llama import LlamaConfig

    base = tinyvlm_spec_config("test-llama").model_dump()
    del base["head_dim"]
    assert LlamaConfig(**base).head_dim == base["hidden_size"] // base["num_heads"]
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        LlamaConfig(**{**base, "hidden_size": 66})


def test_config_json_missing_a_field_is_a_config_error(tmp_path):
    import json

    import tinyvlm

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json lacks 'num_attention_heads', which the llama family needs"):
        tinyvlm.build_decoder(f"local-dir:{tmp_path}", pretrained=False)


def tinyvlm_spec_config(key: str):
    import tinyvlm

    return tinyvlm.get_spec(key).config


def test_command_options_raise_config_errors_in_plain_words():
    from tinyvlm.serve.config import ServeConfig
    from tinyvlm.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^port -1: must be >= 0; max_batch 0: must be >= 1$") as error:
        ServeConfig(port=-1, max_batch=0)
    assert [p["loc"] for p in error.value.problems] == [("port",), ("max_batch",)]  # for the CLI's flag names
    with pytest.raises(ConfigError, match=r"data is required"):
        TrainConfig(output="out", model="test-vlm")
