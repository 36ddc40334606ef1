"""The doors: from names to models, each name resolved once (`tinyvlm.sources.resolve`).

Parts: `build_encoder` / `build_decoder` / `build_projector`. name -> source -> config (the zoo entry's, or the
checkpoint's ``config.json`` read by its family, + validated overrides) -> module built on the meta device ->
strict load of the source's weights.

VLMs, two doors:

* `build_vlm` assembles an encoder and a decoder (or a recipe, by one name) with a new projector.
  ``build_vlm("dinov3-vits16plus", "gemma-3-270m-it")`` resolves each part once, loads both backbones from
  their pinned commits, initialises the projector (pixel-shuffle factor from the encoder's grid unless given),
  adds the image tokens to the decoder's tokenizer (growing the vocabulary only for tokens that are embedded
  like text: the tile markers of image splitting) and records what it built in `VLMConfig.parts`, so that
  `load_vlm` rebuilds the model offline from ``config.json``.
* `load_vlm` loads anything with trained files, in any VLM checkpoint layout the registry knows
  (`Family.read`: tinyvlm's own, SmolVLM / Idefics3, nanoVLM): the layout's family recognises the
  ``config.json``, reads the config and the tokenizer, and the model is built on the meta device and loaded
  strictly through the family's key map; ``adapter=`` applies a LoRA adapter (`tinyvlm.interop.lora`).
  ``VLM.from_pretrained`` is the same function (bound here).

A command that takes one ``--model NAME`` resolves it once and picks the door by what it found
(``load_vlm(source)`` when it has files, ``build_vlm(source)`` for a recipe); the doors take that `Source`.

Every door returns its model prepared for inference (`tinyvlm.inference.prepare_for_inference`), so that the
same weights give the same outputs, bit for bit, whichever door they came through; training takes the
training layouts back (`tinyvlm.inference.prepare_for_training`). ``threads=`` is the intra-op thread count
of the door's own work and of the model's generation steps, set around each and restored after it: no door
changes the process's count. The file layouts of other projects that ``save_pretrained`` writes are wired
here too (`tinyvlm.registry.register_writer`): the model layers cannot import `tinyvlm.interop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyvlm.config import Config, QuantizationConfig
from tinyvlm.decoders.base import DecoderConfig
from tinyvlm.devices import check_device, parse_dtype
from tinyvlm.errors import ConfigError
from tinyvlm.inference.prepare import prepare_for_inference
from tinyvlm.inference.quantize import (
    LoadQuantizer, check_quantize, check_target, quantize_decoder, quantized_structure,
)
from tinyvlm.inference.threads import fixed_threads
from tinyvlm.interop.lora import load_adapter, read_adapter_config
from tinyvlm.interop.transformers import save_hf_decoder, save_idefics3
from tinyvlm.processing.tokens import ImageTokenConfig, default_token_layout
from tinyvlm.registry import Family, Kind, family_for_config, get_family, get_spec, load_families, register_writer
from tinyvlm.sources import Source, adapter_folder, resolve
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vlm.config import DEFAULT_PROJECTOR, BuiltParts, VLMConfig
from tinyvlm.vlm.model import VLM, fit_projector, projector_base, record
from tinyvlm.weights import load_checkpoint

#: A model name (a zoo key, ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH`` or a folder), or what `resolve` made
#: of one.
Name = str | Path | Source


def source_of(name: Name, kind: Kind, *, door: str) -> Source:
    """``name`` resolved (a `Source` is taken as it is, after checking that a zoo entry is of ``kind``)."""
    if not isinstance(name, (str, Path, Source)):
        advice = ": register it as a recipe (tinyvlm.register_model) and build that" if isinstance(name, VLMConfig) else ""
        raise ConfigError(f"{door} takes names (a zoo key, hf-hub:ORG/NAME, local-dir:PATH or a folder), not a "
                          f"{type(name).__name__}{advice}")
    if isinstance(name, Source):
        if name.spec is not None:
            get_spec(name.spec.key, kind=kind)  # a zoo entry of another kind says what it is
        return name
    return resolve(str(name), kind)


# ------------------------------------------------------------------------------------------------ parts


def build_encoder(
    name: Name,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A vision encoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder. ``overrides`` are config fields."""
    source = source_of(name, "encoder", door="build_encoder")
    return _build_part("encoder", source, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides)


def build_decoder(
    name: Name,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A language decoder by zoo key, ``hf-hub:`` repo or ``local-dir:`` folder, prepared for inference.
    ``quantize``: ``"int8"`` / ``"int4"`` weight-only quantization, applied while the checkpoint is read
    (`tinyvlm.inference.quantize`); ``threads``: intra-op threads of the load and of each generation step
    (None: chosen automatically while decoding; `tinyvlm.inference.threads`). ``overrides`` are config fields."""
    with fixed_threads(threads):
        quantization = check_quantize(quantize, dtype=parse_dtype(dtype), device=check_device(device))
        source = source_of(name, "decoder", door="build_decoder")
        decoder = _build_part(
            "decoder", source, pretrained=pretrained, dtype=dtype, device=device, overrides=overrides,
            quantization=quantization,
        )  # fmt: skip
        return prepare_for_inference(decoder, threads=threads)


def build_projector(name: Name, *, in_dim: int, out_dim: int, **overrides: Any) -> nn.Module:
    """A randomly initialised projector from ``in_dim`` (encoder) to ``out_dim`` (decoder)."""
    family, config = part_config("projector", source_of(name, "projector", door="build_projector"), overrides)
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


def _build_part(
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
    (the ``test-*`` zoo entries). In eval mode, not prepared for inference. ``quantization`` (decoders, checked
    by `tinyvlm.inference.quantize.check_quantize`): quantize each matrix as it is read (random init: once built)."""
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


# ------------------------------------------------------------------------------------------------ VLMs


def build_vlm(
    encoder: Name,
    decoder: Name | None = None,
    projector: str | None = None,
    *,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
    projector_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> VLM:
    """Join an ``encoder`` and a ``decoder`` through a new ``projector``, or build a recipe:
    ``build_vlm(RECIPE)``, one zoo key of the ``vlm`` kind, whose options the keywords override. Names are zoo
    keys, ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH`` (or their `Source`). ``projector=None``: a pixel
    shuffle and one Linear (``pixel-shuffle-linear``, nanoVLM's and SmolVLM's), with the image tokens in the
    token layout transformers runs wherever the pair allows it (SmolVLM's for a SigLIP encoder and a
    Llama-family decoder: such a model exports to Idefics3; nanoVLM's otherwise, `default_token_layout`);
    ``processor_kwargs={"token_layout": ...}`` chooses another.

    ``pretrained`` loads the backbones' weights (entries without weights are random-init); the projector is
    always freshly initialised. ``dtype=None`` keeps the checkpoints' dtypes (decoders bf16, encoders fp32)
    and makes the projector fp32. ``*_kwargs`` override config fields of each part; ``processor_kwargs``
    those of `ImageTokenConfig` (``split_images=True, max_grid=4``, ...). ``quantize`` (``"int8"`` /
    ``"int4"``) quantizes the decoder as its checkpoint is read (`tinyvlm.inference.quantize`); ``threads``:
    intra-op threads of the build and of each generation step. Prepared for inference, in eval mode.
    """
    with fixed_threads(threads):
        vlm = _assemble(
            encoder, decoder, projector, pretrained=pretrained, dtype=dtype, device=device,
            options=_Options(encoder_kwargs or {}, decoder_kwargs or {}, projector_kwargs or {},
                             processor_kwargs or {}),
            quantize=quantize,
        )  # fmt: skip
        return prepare_for_inference(vlm, threads=threads)


def load_vlm(
    name: Name,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> VLM:
    """A saved or trained VLM, prepared for inference: a folder written by `VLM.save_pretrained` (a path or
    ``local-dir:PATH``), a Hub repo (``hf-hub:ORG/NAME[@REV]``) or a trained zoo entry, in any layout the
    registry reads (tinyvlm, SmolVLM / Idefics3, nanoVLM). Built on the meta device and loaded strictly.

    ``adapter``: a LoRA adapter folder (``tinyvlm train --lora``, or peft's ``save_pretrained``) applied to
    that base, unmerged (`tinyvlm.interop.lora.merge_adapter` folds it in). With an adapter the base may also
    be a recipe, rebuilt from its parts' pretrained weights, when the adapter holds its trained projector.
    ``quantize`` (``"int8"`` / ``"int4"``) quantizes the decoder as it is read (a checkpoint saved quantized
    loads as it was saved; `tinyvlm.inference.quantize`); ``threads``: intra-op threads of the load and of
    each generation step."""
    with fixed_threads(threads):
        source = source_of(name, "vlm", door="load_vlm")
        if adapter is None:
            vlm = _read_vlm(source, dtype=dtype, device=device, quantize=quantize)
        else:
            vlm = _with_adapter(source, adapter, dtype=dtype, device=device, quantize=quantize)
        return prepare_for_inference(vlm, threads=threads)


@dataclass(frozen=True)
class _Options:
    """The per-part config overrides of `build_vlm` (``*_kwargs``)."""

    encoder: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] = field(default_factory=dict)


def _assemble(
    encoder: Name, decoder: Name | None, projector: str | None, *, pretrained: bool, dtype: torch.dtype | None,
    device: torch.device | str | None, options: _Options, quantize: str | None,
) -> VLM:
    """`build_vlm` before the inference step."""
    dtype, device = parse_dtype(dtype), check_device(device)
    if decoder is None:
        recipe_source = source_of(encoder, "vlm", door="build_vlm")
        config = _recipe_config(recipe_source, projector, options)
        encoder_source, decoder_source = resolve(config.encoder, "encoder"), resolve(config.decoder, "decoder")
    else:
        encoder_source = source_of(encoder, "encoder", door="build_vlm")
        decoder_source = source_of(decoder, "decoder", door="build_vlm")
        config = VLMConfig(
            encoder=encoder_source.name,
            decoder=decoder_source.name,
            projector=projector or DEFAULT_PROJECTOR,
            encoder_kwargs=options.encoder,
            decoder_kwargs=options.decoder,
            projector_kwargs=options.projector,
            image_tokens=ImageTokenConfig.validate_dict(options.processor, context="processor_kwargs"),
        )
    quantization = check_quantize(quantize, dtype=dtype, device=device) or config.quantization
    parts: dict[str, Any] = dict(pretrained=pretrained, dtype=dtype, device=device)
    enc = _build_part("encoder", encoder_source, overrides=config.encoder_kwargs, **parts)
    dec = _build_part("decoder", decoder_source, overrides=config.decoder_kwargs, quantization=quantization, **parts)
    layout = default_token_layout(enc.config.family, dec.config.family)
    config = config.replace(image_tokens=config.image_tokens.resolved(layout))
    tokenizer = Tokenizer.from_folder(decoder_source.tokenizer_folder())  # the weights' commit
    with torch.device(device or "cpu"):
        proj = fit_projector(config, projector_base(config), enc, dec)
    proj = proj.to(dtype or torch.float32)

    tokens = config.image_tokens
    ids = tokenizer.add_special_tokens([*tokens.marker_tokens(), tokens.image_token])
    marker_ids, image_token_id = ids[:-1], ids[-1]
    if marker_ids and max(marker_ids) >= dec.vocab_size:
        dec.resize_vocab(max(marker_ids) + 1)  # rows for the markers only; the image token needs none
    built = BuiltParts(
        encoder=record(enc, encoder_source.commit if pretrained else None),
        decoder=record(dec, decoder_source.commit if pretrained else None),
        projector=record(proj, None),
        image_token_id=image_token_id,
        marker_token_ids=marker_ids,
    )
    return VLM(config.replace(parts=built, quantization=quantization), enc, proj, dec, tokenizer).eval()


def _recipe_config(source: Source, projector: str | None, options: _Options) -> VLMConfig:
    """A recipe's config with the options merged in (a name with files is an error: it is loaded with
    `load_vlm`)."""
    if source.has_files or source.spec is None:
        raise ConfigError(
            f"{source.name!r} is a trained VLM: load it with tinyvlm.load_vlm({source.name!r}) "
            "(build_vlm assembles recipes and encoder + decoder pairs)"
        )
    recipe: VLMConfig = source.spec.config  # type: ignore[assignment]
    return recipe.replace(
        projector=projector or recipe.projector,
        encoder_kwargs={**recipe.encoder_kwargs, **options.encoder},
        decoder_kwargs={**recipe.decoder_kwargs, **options.decoder},
        projector_kwargs={**recipe.projector_kwargs, **options.projector},
        image_tokens=recipe.image_tokens.replace(**options.processor),
    )


def _with_adapter(
    source: Source, adapter: str | Path, *, dtype: torch.dtype | None, device: torch.device | str | None,
    quantize: str | None,
) -> VLM:
    """The base (a checkpoint, or a recipe built from pretrained parts; quantized as it is read with
    ``quantize``) with the LoRA ``adapter`` injected and loaded (a LoRA run's folder means its adapter)."""
    adapter = adapter_folder(adapter)
    saved = read_adapter_config(adapter).modules_to_save or []
    if source.has_files:
        base = _read_vlm(source, dtype=dtype, device=device, quantize=quantize)
    elif "projector" in saved:
        base = _assemble(source, None, None, pretrained=True, dtype=dtype, device=device,
                         options=_Options(), quantize=quantize)
    else:
        raise ConfigError(
            f"{source.name!r} is a recipe, whose projector is freshly initialised, and the adapter {adapter} does not "
            "hold a trained projector: give the saved VLM the adapter was trained on"
        )
    return load_adapter(base, adapter)


def _vlm_family(source: Source) -> Family:
    """The VLM layout family of a checkpoint (its zoo entry's, or the one recognising its config.json)."""
    if source.spec is not None:
        return get_family(source.spec.family)
    return family_for_config(source.config_json(), "vlm", where=source.name)


def _read_vlm(
    source: Source, *, dtype: torch.dtype | None, device: torch.device | str | None, quantize: str | None = None
) -> VLM:
    """Read a VLM checkpoint through its layout family: config and tokenizer, meta build, strict load. A
    checkpoint saved quantized gets its quantized modules before the load; ``quantize`` quantizes a float
    one as it is read."""
    if not source.has_files:
        raise ConfigError(f"{source.name!r} is a recipe (untrained): build it with tinyvlm.build_vlm({source.name!r})")
    dtype, device = parse_dtype(dtype), check_device(device)
    wanted = check_quantize(quantize, dtype=dtype, device=device)
    family = _vlm_family(source)
    assert family.read is not None and family.key_map is not None, f"VLM family {family.name} cannot read files"
    config, tokenizer = family.read(source)
    stored = config.quantization
    if stored is not None and wanted is not None and wanted != stored:
        raise ConfigError(
            f"{source.name} is saved quantized as {stored.mode}; load it without quantize= (or with "
            f"quantize={stored.mode!r}), or quantize the unquantized checkpoint as {wanted.mode}"
        )
    with torch.device("meta"):
        vlm = family.build(config)
    if stored is not None:
        check_target(stored, dtype=dtype, device=device)
        quantized_structure(vlm.decoder, stored)
    filler = LoadQuantizer(vlm, wanted, prefix="decoder.") if wanted is not None and stored is None else None
    load_checkpoint(vlm, source.weight_files(), family.key_map(config), dtype=dtype, device=device, filler=filler)
    if filler is not None:
        vlm.config = vlm.config.replace(quantization=wanted)
    vlm.tokenizer = tokenizer
    return vlm.eval()


# ------------------------------------------------------------------------------------------------ wiring

VLM.from_pretrained = staticmethod(load_vlm)
register_writer("transformers", "vlm", save_idefics3)
register_writer("transformers", "decoder", save_hf_decoder)
