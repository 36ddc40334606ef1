"""The base of every configuration: a frozen, validated pydantic model that round-trips through JSON."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tinyvlm.errors import ConfigError


class Config(BaseModel):
    """A family's configuration. Unknown fields are errors; instances are immutable (edit with `replace`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    #: The family this config belongs to (``"siglip"``, ``"llama"``, ...). Set by each subclass.
    family: ClassVar[str] = ""

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "Config":
        """Read an official ``config.json``. Families that load Hugging Face checkpoints override this."""
        raise ConfigError(f"the {cls.family or cls.__name__} family does not read Hugging Face config.json files")

    @classmethod
    def validate_dict(cls, values: dict[str, Any], *, context: str = "") -> "Config":
        """Validate ``values`` into this config, turning pydantic's errors into one readable `ConfigError`."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(_describe(cls, error, context)) from None

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
        else:
            problems.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    prefix = f"{context}: " if context else ""
    return f"{prefix}invalid {cls.__name__}: " + "; ".join(problems)


def require(hf_config: dict[str, Any], key: str, expected: Any, *, family: str) -> None:
    """Refuse a ``config.json`` whose ``key`` changes the math in a way the family does not implement."""
    value = hf_config.get(key, expected)
    if value != expected:
        raise ConfigError(
            f"{family} checkpoint has {key}={value!r}; tinyvlm implements only {key}={expected!r}, "
            "so its outputs would differ from the reference. Open an issue if you need this variant."
        )
