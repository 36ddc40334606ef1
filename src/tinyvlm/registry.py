"""The model zoo: families and the checkpoints registered under string keys.

Each family module (``encoders/siglip.py``, ``decoders/gemma3.py``, ...) calls `register_family` once and
`register_model` for each of its zoo entries, next to its code. Those modules import torch, so listing the
zoo from them would cost a torch import; instead the shipped entries are read from ``zoo.json``, an index
generated from the family modules (``python -m tinyvlm.registry --write``) and checked against them by the
test suite. One zoo: `list_models` and `get_spec` give the shipped entries and every live registration (a
user's `register_model`, or a family module once imported) alike; a live entry is measured (parameters,
width) on the meta device when the index does not hold it. Everything in this module is torch-free; only
measuring a live entry that the index lacks imports torch (its family already did).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from tinyvlm.errors import ConfigError, UnknownModelError

if TYPE_CHECKING:
    from tinyvlm.config import Config
    from tinyvlm.sources import Source
    from tinyvlm.weights import KeyMap

Kind = Literal["encoder", "decoder", "projector", "vlm"]
KINDS: tuple[Kind, ...] = ("encoder", "decoder", "projector", "vlm")

#: The modules that register the built-in families and their zoo entries.
FAMILY_MODULES: tuple[str, ...] = (
    "tinyvlm.encoders.siglip",
    "tinyvlm.encoders.dinov3",
    "tinyvlm.projectors.pixel_shuffle",
    "tinyvlm.decoders.llama",
    "tinyvlm.decoders.gemma3",
    "tinyvlm.vlm.recipes",
    "tinyvlm.formats.smolvlm",
    "tinyvlm.formats.nanovlm",
)

INDEX_PATH = Path(__file__).with_name("zoo.json")


@dataclass(frozen=True)
class Family:
    """A model family: how to validate its config, build its module and read its checkpoints.

    Encoder and decoder families read a checkpoint's ``config.json`` with ``config_cls.from_hf``. A VLM
    layout (tinyvlm's own saves, SmolVLM / Idefics3, nanoVLM) needs more than ``config.json`` (processor
    settings, a tokenizer, perhaps named by another repo), so it gives ``read``.
    """

    name: str
    kind: Kind
    config_cls: type["Config"]
    #: Builds the module from a config; called under ``torch.device("meta")`` before loading weights.
    build: Callable[["Config"], Any]
    #: How the family's checkpoint keys map onto the module; None when it has no checkpoints to read.
    key_map: Callable[["Config"], "KeyMap"] | None = None
    #: The ``model_type`` values of ``config.json`` files this family reads (for ``hf-hub:`` / ``local-dir:``).
    hf_model_types: tuple[str, ...] = ()
    #: Recognises a ``config.json`` that has no ``model_type`` (nanoVLM's flat one); checked before the types.
    detect: Callable[[dict[str, Any]], bool] | None = None
    #: VLM layouts: a checkpoint (its `Source`) -> its config (with resolved parts) and its tokenizer.
    read: Callable[["Source"], tuple["Config", Any]] | None = None
    #: VLM layouts: ``config.json`` alone (and the name, for messages) -> the config of the architecture, as
    #: transformers' AutoConfig reads it: no tokenizer, no processor files (`tinyvlm info`).
    read_config: Callable[[dict[str, Any], str], "Config"] | None = None
    #: How a ``config.json`` of this family is recognised, for messages ("model_type 'idefics3'").
    describes: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. ``config`` is the validated family config (a copy you may edit with ``.replace``)."""

    key: str
    kind: Kind
    family: str
    hub_repo: str | None
    revision: str | None
    params: int | None
    dim: int | None
    license: str
    gated: bool
    description: str
    #: True for VLMs that were trained end to end (load them with `load_vlm`), False for everything else.
    trained: bool = False
    config_json: dict[str, Any] = field(default_factory=dict, repr=False, compare=True)

    @property
    def config(self) -> "Config":
        return get_family(self.family).config_cls.validate_dict(self.config_json, context=self.key)

    @property
    def has_weights(self) -> bool:
        return self.hub_repo is not None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Entry:
    key: str
    family: str
    config: "Config"
    hub_repo: str | None
    revision: str | None
    license: str
    gated: bool
    description: str
    trained: bool


_FAMILIES: dict[str, Family] = {}
_ENTRIES: dict[str, _Entry] = {}
_families_loaded = False
#: The file layouts models are saved in besides tinyvlm's own, by (layout, kind) (`register_writer`).
_WRITERS: dict[tuple[str, Kind], Callable[..., Path]] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ConfigError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def register_writer(layout: str, kind: Kind, write: Callable[..., Path]) -> None:
    """Make ``save_pretrained(folder, layout=layout)`` of a ``kind`` model call ``write(model, folder, ...)``
    (a VLM's writer takes ``(vlm, folder, overwrite=)``, a decoder's ``(decoder, folder, tokenizer=, overwrite=)``;
    ``overwrite`` as `tinyvlm.vlm.files.check_target` says). `tinyvlm.interop`
    registers the layouts of other projects (transformers', ...); the model layers cannot import it, since it
    imports them."""
    if (layout, kind) in _WRITERS:
        raise ConfigError(f"a writer of the {layout!r} layout for {kind}s is already registered")
    _WRITERS[(layout, kind)] = write


def get_writer(layout: str, kind: Kind) -> Callable[..., Path]:
    """The writer `register_writer` registered for ``layout`` and ``kind``; a `ConfigError` naming those there
    are otherwise."""
    try:
        return _WRITERS[(layout, kind)]
    except KeyError:
        known = sorted(name for name, of in _WRITERS if of == kind)
        extra = " (tinyvlm's own: 'tinyvlm')" if kind == "vlm" else ""
        hint = ", ".join(repr(name) for name in known) if known else "none registered: import tinyvlm.interop"
        raise ConfigError(f"layout={layout!r}: {_a(kind)} is saved in {hint}{extra}") from None


def register_model(
    key: str,
    *,
    family: str,
    config: "Config",
    hub_repo: str | None = None,
    revision: str | None = None,
    license: str,
    gated: bool = False,
    description: str,
    trained: bool = False,
) -> None:
    """Add a zoo entry. Keys are lower-case kebab case and unique across all kinds."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", key):
        raise ConfigError(f"zoo key {key!r} must be lower-case kebab case (letters, digits, '-', '.')")
    if key in _ENTRIES:
        raise ConfigError(f"zoo key {key!r} is already registered (by family {_ENTRIES[key].family!r})")
    shipped = _read_index().get(key)
    if shipped is not None and shipped.family != family:
        raise ConfigError(f"zoo key {key!r} is a shipped {shipped.family} entry; register yours under another key")
    if family not in _FAMILIES:
        raise ConfigError(f"register family {family!r} before its zoo entry {key!r}")
    if not isinstance(config, _FAMILIES[family].config_cls):
        raise ConfigError(f"zoo entry {key!r}: config must be a {_FAMILIES[family].config_cls.__name__}")
    _ENTRIES[key] = _Entry(key, family, config, hub_repo, revision, license, gated, description, trained)


def load_families() -> None:
    """Import every built-in family module (this imports torch)."""
    global _families_loaded
    if not _families_loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _families_loaded = True


def get_family(name: str) -> Family:
    load_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(f"unknown family {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None


def family_for_config(hf_config: dict[str, Any], kind: Kind | None = None, *, where: str = "") -> Family:
    """The family that reads this ``config.json``: the one whose ``detect`` recognises it, else the one
    listing its ``model_type``. A family of another kind, or none, is a `ConfigError` naming what is supported."""
    load_families()
    model_type = hf_config.get("model_type")
    found = next((f for f in _FAMILIES.values() if f.detect is not None and f.detect(hf_config)), None)
    if found is None and model_type:
        found = next((f for f in _FAMILIES.values() if model_type in f.hf_model_types), None)
    prefix = f"{where}: " if where else ""
    if found is not None and (kind is None or found.kind == kind):
        return found
    if found is not None:
        raise ConfigError(f"{prefix}config.json describes {_a(found.kind)} ({found.name} family), not {_a(kind or '')}")
    supported = sorted(
        description
        for f in _FAMILIES.values()
        if kind in (None, f.kind)
        for description in ([f"model_type {t!r}" for t in f.hf_model_types] + ([f.describes] if f.describes else []))
    )
    what = f"{kind} " if kind else ""
    seen = f"model_type {model_type!r}" if model_type else "no model_type"
    raise ConfigError(
        f"{prefix}config.json has {seen}, which is not a supported {what}family. tinyvlm reads: {', '.join(supported)}"
    )


def get_config(key: str, *, kind: Kind | None = None) -> "Config":
    """The registered config of zoo entry ``key`` (imports the family modules; measures nothing, so a family
    whose ``build`` composes other zoo entries, as the VLM recipes do, can call it while being measured)."""
    load_families()
    entry = _ENTRIES.get(key)
    if entry is None or (kind is not None and _FAMILIES[entry.family].kind != kind):
        raise UnknownModelError(_unknown_message(key, kind, _all_specs()))
    return entry.config


# ----------------------------------------------------------------------------------------------- listing


def list_models(pattern: str | None = None, *, kind: Kind | None = None) -> list[ModelSpec]:
    """Zoo entries whose key matches the fnmatch ``pattern``, of one ``kind`` if given, naturally sorted."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    specs = _all_specs().values()
    if pattern:
        specs = [s for s in specs if fnmatch.fnmatchcase(s.key, pattern.lower())]
    if kind:
        specs = [s for s in specs if s.kind == kind]
    return sorted(specs, key=lambda s: _natural_key(s.key))


def get_spec(key: str, *, kind: Kind | None = None) -> ModelSpec:
    """The zoo entry ``key``; `UnknownModelError` suggests the closest keys."""
    specs = _all_specs()
    spec = specs.get(key)
    if spec is not None and (kind is None or spec.kind == kind):
        return spec
    raise UnknownModelError(_unknown_message(key, kind, specs))


def _unknown_message(key: str, kind: Kind | None, specs: dict[str, ModelSpec]) -> str:
    what = kind or "model"
    if key in specs:
        other = specs[key]
        return (
            f"{key!r} is {_a(other.kind)}, not {_a(what)}. "
            f"Pass it where {_a(other.kind)} is expected (see `tinyvlm list-models --kind {other.kind}`)."
        )
    if "/" in key or key.startswith((".", "~")):
        return (
            f"{key!r} is not a zoo key. For a Hub repo write 'hf-hub:{key.lstrip('./')}', "
            f"for a local folder 'local-dir:{key}'."
        )
    candidates = [s.key for s in specs.values() if kind is None or s.kind == kind]
    close = difflib.get_close_matches(key.lower(), candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = f"tinyvlm list-models --kind {kind}" if kind else "tinyvlm list-models"
    return f"unknown {what} {key!r}.{hint} See `{listing}` for the zoo."


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _natural_key(key: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key) if part]


def _all_specs() -> dict[str, ModelSpec]:
    """The shipped entries (the torch-free index) and the live registrations, a live one replacing the
    shipped entry of its key (the same entry, once its family module ran)."""
    return {**_read_index(), **_live_specs()}


_index_cache: dict[str, ModelSpec] | None = None


def _read_index() -> dict[str, ModelSpec]:
    global _index_cache
    if _index_cache is None:
        rows = json.loads(INDEX_PATH.read_text()) if INDEX_PATH.exists() else []
        _index_cache = {row["key"]: ModelSpec(**row) for row in rows}
    return _index_cache


_live_cache: dict[str, ModelSpec] = {}


def _live_specs() -> dict[str, ModelSpec]:
    index = _read_index()
    specs = {}
    for key, entry in _ENTRIES.items():
        cached = _live_cache.get(key)
        if cached is None or cached.config_json != entry.config.model_dump(mode="json"):
            cached = _live_cache[key] = _spec_of(entry, index.get(key))
        specs[key] = cached
    return specs


def _spec_of(entry: _Entry, indexed: ModelSpec | None) -> ModelSpec:
    family = _FAMILIES[entry.family]
    config_json = entry.config.model_dump(mode="json")
    if indexed is not None and indexed.config_json == config_json:
        params, dim = indexed.params, indexed.dim
    else:
        params, dim = measure(family, entry.config)
    return ModelSpec(
        key=entry.key,
        kind=family.kind,
        family=entry.family,
        hub_repo=entry.hub_repo,
        revision=entry.revision,
        params=params,
        dim=dim,
        license=entry.license,
        gated=entry.gated or _parts_gated(entry),
        description=entry.description,
        trained=entry.trained,
        config_json=config_json,
    )


def _parts_gated(entry: _Entry) -> bool:
    """A VLM recipe downloads its encoder and decoder, so it is gated when either zoo part is."""
    if _FAMILIES[entry.family].kind != "vlm" or entry.trained:
        return False
    parts = (entry.config.encoder, entry.config.decoder)  # type: ignore[attr-defined]  # a VLMConfig
    return any(_ENTRIES[name].gated for name in parts if name in _ENTRIES)


def measure(family: Family, config: "Config") -> tuple[int | None, int | None]:
    """Parameter count and output width of a family's module, built on the meta device (no memory)."""
    if family.kind == "projector":
        return None, None  # both depend on the encoder and decoder it joins
    import torch

    with torch.device("meta"):
        module = family.build(config)
    params = sum(p.numel() for p in module.parameters())
    return params, int(module.dim)


def write_index() -> int:
    """Regenerate ``zoo.json`` from the family modules; returns the number of entries."""
    load_families()
    rows = [_spec_of(entry, None).to_json() for entry in _ENTRIES.values()]
    rows.sort(key=lambda row: _natural_key(row["key"]))
    INDEX_PATH.write_text(json.dumps(rows, indent=1) + "\n")
    global _index_cache
    _index_cache = None
    return len(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tinyvlm.registry --write   (regenerates src/tinyvlm/zoo.json)")
    from tinyvlm import registry  # the imported module, which the family modules register into

    print(f"wrote {registry.write_index()} entries to {registry.INDEX_PATH}")
