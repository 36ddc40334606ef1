"""``build_encoder`` / ``build_decoder`` / ``build_projector``: from a name to a ready module.

name -> `tinyvlm.sources.resolve` -> config (the zoo entry's, or the checkpoint's ``config.json`` read by its
family, + validated overrides) -> module built on the meta device -> strict load of the source's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyvlm.config import Config, QuantizationConfig
from tinyvlm.decoders.base import DecoderConfig
from tinyvlm.devices import check_device, parse_dtype
from tinyvlm.errors import ConfigError
from tinyvlm.quantize import LoadQuantizer, check_quantize, quantize_decoder
from tinyvlm.registry import Family, Kind, family_for_config, get_family, load_families
from tinyvlm.sources import Source, resolve
from tinyvlm.threads import set_threads
from tinyvlm.weights import load_checkpoint


def build_encoder(
    name: str,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A vision encoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder. ``overrides`` are config fields."""
    source = resolve(name, "encoder")
    return build_part("encoder", source, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides)


def build_decoder(
    name: str,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A language decoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder, ready for inference
    (`prepare_for_inference`). ``quantize``: ``"int8"`` / ``"int4"`` weight-only quantization, applied
    while the checkpoint is read (`tinyvlm.quantize`); ``threads``: intra-op threads (`tinyvlm.threads`;
    None: chosen automatically while decoding). ``overrides`` are config fields."""
    set_threads(threads)
    quantization = check_quantize(quantize, dtype=parse_dtype(dtype), device=check_device(device))
    source = resolve(name, "decoder")
    decoder = build_part(
        "decoder", source, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides,
        quantization=quantization,
    )
    return decoder.prepare_for_inference()


def build_projector(name: str, *, in_dim: int, out_dim: int, **overrides: Any) -> nn.Module:
    """A randomly initialised projector from ``in_dim`` (encoder) to ``out_dim`` (decoder)."""
    family, config = part_config("projector", resolve(name, "projector"), overrides)
    return family.build(config.replace(in_dim=in_dim, out_dim=out_dim))


def part_config(kind: Kind, source: Source, overrides: dict[str, Any]) -> tuple[Family, Config]:
    """The family and validated config of a resolved name, with ``overrides`` applied.

    Zoo entries carry their config; checkpoints are read from their ``config.json`` by the family that
    recognises it, and a decoder's ``generation_config.json``, when present, overrides its special token ids
    (Gemma-3-it stops on ``[1, 106]``), as in transformers.
    """
    load_families()
    if source.spec is not None:
        family = get_family(source.spec.family)
        config = source.spec.config
    else:
        hf_config = source.config_json()
        family = family_for_config(hf_config, kind, where=source.name)
        try:
            config = family.config_cls.from_hf(hf_config)
        except KeyError as error:
            raise ConfigError(f"{source.name}: config.json lacks {error}, which the {family.name} family needs") from None
        if isinstance(config, DecoderConfig):
            generation = source.json("generation_config.json")
            if generation:
                config = config.with_generation_config(generation)
    return family, config.replace(**overrides) if overrides else config


def build_part(
    kind: Kind,
    source: Source,
    *,
    pretrained: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    overrides: dict[str, Any],
    quantization: QuantizationConfig | None = None,
) -> nn.Module:
    """Load the source's weights, or initialise at random when ``pretrained`` is False or it has none
    (the ``test-*`` zoo entries). In eval mode, in the training layout. ``quantization`` (decoders, checked
    by `tinyvlm.quantize.check_quantize`): quantize each matrix as it is read (random init: once built)."""
    dtype, device = parse_dtype(dtype), check_device(device)
    if quantization is not None and kind != "decoder":
        raise ConfigError(f"quantize applies to decoders; this is {_a(kind)}")
    family, config = part_config(kind, source, overrides)
    if pretrained and source.has_files:
        if family.key_map is None:
            raise ConfigError(f"the {family.name} family has no checkpoints to load; use pretrained=False")
        files = source.weight_files()
        with torch.device("meta"):
            module = family.build(config)
        filler = None if quantization is None else LoadQuantizer(module, quantization)
        return load_checkpoint(module, files, family.key_map(config), dtype=dtype, device=device, filler=filler).eval()
    with torch.device(device or "cpu"):
        module = family.build(config)
    module = module.to(dtype) if dtype is not None else module
    return (module if quantization is None else quantize_decoder(module, quantization)).eval()


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
