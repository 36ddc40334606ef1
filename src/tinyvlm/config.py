"""The base of every configuration: a frozen, validated pydantic model that round-trips through JSON."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


#: ``quantize=`` / ``--quantize`` values: weight-only int8 or int4 (see `tinyvlm.inference.quantize`).
QUANT_MODES = ("int8", "int4")
#: Input channels per int4 scale / zero point (the kernels take 32, 64, 128 or 256; 32 divides every width
#: in the zoo, e.g. SmolLM2's 576, which 128 does not).
INT4_GROUP_SIZE = 32


class QuantizationConfig(Config):
    """How a decoder's matrices are stored (weight-only quantization; activations stay floating point).

    ``mode`` applies to the linear layers of the decoder blocks, except those whose names end with one of
    ``int8_layers``, which are int8; ``embedding`` to the token-embedding table (which a tied LM head
    shares) and to an untied LM head. ``group_size`` (int4 only): consecutive input channels sharing one scale and zero.
    The stored layout is described in `tinyvlm.inference.quantize`; `for_mode` gives what ``quantize=`` means.
    """

    family: ClassVar[str] = "quantization"

    mode: Literal["int8", "int4"]
    embedding: Literal["int8", "int4"]
    group_size: int | None = None
    int8_layers: list[str] = []

    @classmethod
    def for_mode(cls, mode: str) -> "QuantizationConfig":
        """What ``quantize=mode`` means (a `ConfigError` for a mode that does not exist).

        ``"int8"``: every matrix int8. ``"int4"``: q, k, o and down projections int4 (groups of 32); the value,
        gate and up projections and the embedding / LM head int8. Measured on the real
        Gemma-3 270M (docs/decoders.md, "Quantization"): those three projections in int4 each cost 3-11 %
        perplexity, the other four 0.4-1.8 %, the embedding 5 %; all-int4 lost 20-32 %.
        """
        if mode not in QUANT_MODES:
            raise ConfigError(f"unknown quantize mode {mode!r}; use one of {', '.join(QUANT_MODES)} (or None for none)")
        if mode == "int8":
            return cls(mode="int8", embedding="int8")
        return cls(
            mode="int4", embedding="int8", group_size=INT4_GROUP_SIZE,
            int8_layers=["self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
        )

    def mode_of(self, module_name: str) -> str:
        """The storage of the linear layer ``module_name`` (a name inside the decoder)."""
        return "int8" if any(module_name.endswith(suffix) for suffix in self.int8_layers) else self.mode

    @model_validator(mode="after")
    def _group_size_for_int4(self) -> "QuantizationConfig":
        int4 = "int4" in (self.mode, self.embedding)
        if int4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 needs group_size 32, 64, 128 or 256 (got {self.group_size})")
        if not int4 and self.group_size is not None:
            raise ValueError("group_size applies to int4 only; leave it out for int8")
        return self


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


class Options(BaseModel):
    """The options of a command (`tinyvlm.train`, ``tinyvlm serve``): validated like a `Config`, with errors in
    the words of a command line (``max_steps 0: must be >= 1``). The `ConfigError` carries pydantic's problem
    list as ``problems``, so that the CLI can name the flags instead (``--max-steps 0: must be >= 1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            problem = ConfigError("; ".join(describe_options(type(self), error.errors(), str)))
            problem.problems = error.errors()  # type: ignore[attr-defined]
            raise problem from None


class RuntimeOptions(Options):
    """How a command runs its model, shared by every command that runs one (``generate``, ``eval``, ``serve``,
    ``train``): the flags ``--quantize`` and ``--threads``. The defaults are fp32 weights as stored (exact) and
    an automatic thread count (`tinyvlm.inference.threads`)."""

    quantize: Literal["int8", "int4"] | None = Field(
        None, description="weight-only quantization of the decoder, applied while its checkpoint is read: int8 or "
        "int4 (default: none, the weights as stored; see docs/decoders.md)")
    threads: int | None = Field(None, ge=1, description="intra-op CPU threads (default: chosen per step between all "
                                "and one, see docs/decoders.md)")


def describe_options(model: type[BaseModel], problems: list[Any], name: Any) -> list[str]:
    """One line per problem, in plain words; ``name(field)`` writes a field the way the user knows it."""
    lines = []
    for item in problems:
        field = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown option {name(field)} (valid: {', '.join(name(f) for f in model.model_fields)})")
        elif item["type"] == "missing":
            lines.append(f"{name(field)} is required")
        elif field:
            lines.append(f"{name(field)} {item.get('input')!r}: {_plain(item)}")
        else:
            lines.append(_plain(item))
    return lines


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _plain(item: Any) -> str:
    """pydantic's message for one problem, in the words of a command line."""
    ctx = item.get("ctx") or {}
    if item["type"] in _BOUNDS:
        return f"must be {_BOUNDS[item['type']]} {next(iter(ctx.values()))}"
    if item["type"] in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if item["type"] in ("float_parsing", "float_type"):
        return "must be a number"
    if item["type"] == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return item["msg"].removeprefix("Value error, ")
