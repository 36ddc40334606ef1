"""The base of every configuration: a frozen, validated pydantic model that round-trips through JSON."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tinyvlm.errors import ConfigError


#: Activation functions by their ``config.json`` names (``tinyvlm.layers.ACTIVATIONS`` implements each).
ACTIVATION_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "swish", "relu")


class Config(BaseModel):
    """A family's configuration. Unknown fields are errors; instances are immutable (edit with `replace`).
    However it is made (the constructor, `validate_dict`, `replace`, ``from_hf``), an invalid config is a
    `ConfigError` naming each bad field."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    #: The family this config belongs to (``"siglip"``, ``"llama"``, ...). Set by each subclass.
    family: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_describe(type(self), error, "")) from None

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "Config":
        """Read an official ``config.json``. Families that load Hugging Face checkpoints override this."""
        raise ConfigError(f"the {cls.family or cls.__name__} family does not read Hugging Face config.json files")

    @classmethod
    def validate_dict(cls, values: dict[str, Any], *, context: str = "") -> "Config":
        """Validate ``values`` into this config; ``context`` (a model name) prefixes the `ConfigError`."""
        if not isinstance(values, dict):
            raise ConfigError(f"{context + ': ' if context else ''}{cls.__name__} needs a JSON object, got {values!r}")
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{context}: {error}" if context else str(error)) from None

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with ``overrides`` applied; an unknown field names the valid ones."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            valid = ", ".join(sorted(type(self).model_fields))
            raise ConfigError(
                f"unknown {type(self).__name__} field(s): {', '.join(unknown)}. Valid fields: {valid}"
            )
        return type(self).validate_dict({**self.model_dump(), **overrides})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _describe(cls: type[BaseModel], error: ValidationError, context: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            valid = ", ".join(sorted(cls.model_fields))
            problems.append(f"unknown field {where!r} (valid fields: {valid})")
        elif isinstance(item.get("ctx", {}).get("error"), ConfigError):  # a nested config's own message
            nested = str(item["ctx"]["error"])
            problems.append(f"{where}: {nested}" if item["loc"] else nested)
        elif not item["loc"]:  # a whole-config rule (divisibility, ...)
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message} (got {item.get('input')!r})")
    prefix = f"{context}: " if context else ""
    return f"{prefix}invalid {cls.__name__}: " + "; ".join(problems)


def check_activation(name: str) -> str:
    """A validator body: ``name`` must be one of `ACTIVATION_NAMES`."""
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATION_NAMES)}")
    return name


def require(hf_config: dict[str, Any], key: str, expected: Any, *, family: str) -> None:
    """Refuse a ``config.json`` whose ``key`` changes the math in a way the family does not implement."""
    value = hf_config.get(key, expected)
    if value != expected:
        raise ConfigError(
            f"{family} checkpoint has {key}={value!r}; tinyvlm implements only {key}={expected!r}, "
            "so its outputs would differ from the reference. Open an issue if you need this variant."
        )
