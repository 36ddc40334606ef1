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
