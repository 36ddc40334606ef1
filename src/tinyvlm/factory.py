"""``build_encoder`` / ``build_decoder`` / ``build_projector``: from a name to a ready module."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyvlm.config import Config
from tinyvlm.decoders.base import DecoderConfig
from tinyvlm.errors import ConfigError, HubError
from tinyvlm.hub import Source, model_folder, parse_name, read_config
from tinyvlm.registry import Family, Kind, family_for_model_type, get_family, load_families
from tinyvlm.weights import load_checkpoint, safetensors_files


def build_encoder(
    name: str,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
):
    """A vision encoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder. ``overrides`` are config fields."""
    return build_module("encoder", name, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides)


def build_decoder(
    name: str,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
):
    """A language decoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder. ``overrides`` are config fields."""
    return build_module("decoder", name, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides)


def build_projector(name: str, *, in_dim: int, out_dim: int, **overrides: Any):
    """A randomly initialised projector from ``in_dim`` (encoder) to ``out_dim`` (decoder)."""
    family, config = resolve_config("projector", parse_name(name, "projector"), overrides)
    return family.build(config.replace(in_dim=in_dim, out_dim=out_dim))


def resolve_config(
    kind: Kind | None, source: Source, overrides: dict[str, Any], *, folder: Path | None = None
) -> tuple[Family, Config]:
    """The family and validated config of a name, with ``overrides`` applied.

    Zoo entries carry their config; ``hf-hub:`` and ``local-dir:`` names are read from their ``config.json``
    (in ``folder`` when the caller already fetched it, so that config and weights come from one commit);
    a decoder's ``generation_config.json`` next to it, when present, overrides its special token ids
    (Gemma-3-it stops on ``[1, 106]``), as in transformers.
    """
    load_families()
    if source.spec is not None:
        family = get_family(source.spec.family)
        config = source.spec.config
    else:
        folder = folder or model_folder(source, weights=False)
        hf_config = read_config(folder)
        model_type = hf_config.get("model_type")
        if not model_type:
            raise ConfigError(f"{source.name}: config.json has no model_type, so its family is unknown")
        family = family_for_model_type(model_type, kind)
        config = family.config_cls.from_hf(hf_config)
        generation = folder / "generation_config.json"
        if isinstance(config, DecoderConfig) and generation.is_file():
            config = config.with_generation_config(_read_json(generation))
    return family, config.replace(**overrides) if overrides else config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise HubError(f"cannot read {path}: {error}") from None


def build_module(
    kind: Kind,
    name: str,
    *,
    pretrained: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    overrides: dict[str, Any],
) -> nn.Module:
    """Load ``name``'s weights, or initialise it at random when ``pretrained`` is False or it has none
    (the ``test-*`` zoo entries)."""
    source = parse_name(name, kind)
    folder = None
    if source.spec is None and source.has_files:  # hf-hub: / local-dir: names are described by config.json
        folder = model_folder(source, weights=False)
        if source.repo_id is not None:  # fetch the weights at the commit the config came from
            source = dataclasses.replace(source, revision=folder.name)
    family, config = resolve_config(kind, source, overrides, folder=folder)
    if pretrained and source.has_files:
        if family.key_map is None:
            raise ConfigError(f"the {family.name} family has no checkpoints to load; use pretrained=False")
        files = safetensors_files(model_folder(source, weights=True))
        with torch.device("meta"):
            module = family.build(config)
        return load_checkpoint(module, files, family.key_map(config), dtype=dtype, device=device).eval()
    with torch.device(device or "cpu"):
        module = family.build(config)
    return (module.to(dtype) if dtype is not None else module).eval()
