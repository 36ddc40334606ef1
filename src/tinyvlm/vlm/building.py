"""From names to VLMs: `build_vlm` (assemble a recipe or a pair), `load_vlm` (a saved or trained model),
and `open_vlm`, the one entry the commands use for ``--model NAME`` (whichever of the two the name means).

``build_vlm("dinov3-vits16plus", "gemma-3-270m-it")`` resolves each part once (`tinyvlm.sources.resolve`),
loads both backbones from their pinned commits, initialises the projector (pixel-shuffle factor from the
encoder's grid unless given), adds the image tokens to the decoder's tokenizer (growing the vocabulary only
for tokens that are embedded like text: the tile markers of image splitting) and records what it built in
`VLMConfig.parts`, so that `load_vlm` rebuilds the model offline from ``config.json``.

`load_vlm` reads any VLM checkpoint layout the registry knows (`Family.read`: tinyvlm's own, SmolVLM /
Idefics3, nanoVLM): the layout's family recognises the ``config.json``, reads the config and the tokenizer,
and the model is built on the meta device and loaded strictly through the family's key map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tinyvlm.devices import check_device, parse_dtype
from tinyvlm.errors import ConfigError
from tinyvlm.factory import build_part
from tinyvlm.quantize import LoadQuantizer, check_quantize, check_target, quantized_structure
from tinyvlm.registry import Family, family_for_config, get_family, get_spec
from tinyvlm.sources import Source, resolve
from tinyvlm.threads import set_threads
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vlm.config import BuiltParts, ImageTokenConfig, VLMConfig
from tinyvlm.vlm.model import VLM, fit_projector, projector_base, record
from tinyvlm.weights import load_checkpoint


def build_vlm(
    encoder: str | VLMConfig,
    decoder: str | None = None,
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
    """Join an encoder and a decoder through a projector (default ``pixel-shuffle-mlp``), or build a recipe
    (one name, or a `VLMConfig`). Names are zoo keys, ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH``.

    ``pretrained`` loads the backbones' weights (entries without weights are random-init); the projector is
    always freshly initialised. ``dtype=None`` keeps the checkpoints' dtypes (decoders bf16, encoders fp32)
    and makes the projector fp32. ``*_kwargs`` override config fields of each part; ``processor_kwargs``
    those of `ImageTokenConfig` (``split_images=True, max_grid=4``, ...). ``quantize`` (``"int8"`` /
    ``"int4"``) quantizes the decoder as its checkpoint is read (`tinyvlm.quantize`); ``threads`` sets the
    intra-op threads (`tinyvlm.threads`). The model comes in eval mode and the training layout; call
    ``prepare_for_inference()`` before decoding with it.
    """
    set_threads(threads)
    dtype, device = parse_dtype(dtype), check_device(device)
    config = recipe_config(encoder, decoder, projector, encoder_kwargs, decoder_kwargs, projector_kwargs, processor_kwargs)
    quantization = check_quantize(quantize, dtype=dtype, device=device) or config.quantization
    encoder_source, decoder_source = resolve(config.encoder, "encoder"), resolve(config.decoder, "decoder")
    options: dict[str, Any] = dict(pretrained=pretrained, dtype=dtype, device=device)
    enc = build_part("encoder", encoder_source, overrides=config.encoder_kwargs, **options)
    dec = build_part("decoder", decoder_source, overrides=config.decoder_kwargs, quantization=quantization, **options)
    tokenizer = Tokenizer.from_folder(decoder_source.tokenizer_folder())  # the weights' commit
    with torch.device(device or "cpu"):
        proj = fit_projector(config, projector_base(config), enc, dec)
    proj = proj.to(dtype or torch.float32)

    tokens = config.image_tokens
    ids = tokenizer.add_special_tokens([*tokens.marker_tokens(), tokens.image_token])
    marker_ids, image_token_id = ids[:-1], ids[-1]
    if marker_ids and max(marker_ids) >= dec.vocab_size:
        dec.resize_vocab(max(marker_ids) + 1)  # rows for the markers only; the image token needs none
    parts = BuiltParts(
        encoder=record(enc, encoder_source.commit if pretrained else None),
        decoder=record(dec, decoder_source.commit if pretrained else None),
        projector=record(proj, None),
        image_token_id=image_token_id,
        marker_token_ids=marker_ids,
    )
    return VLM(config.replace(parts=parts, quantization=quantization), enc, proj, dec, tokenizer).eval()


def recipe_config(
    encoder: str | VLMConfig,
    decoder: str | None,
    projector: str | None,
    encoder_kwargs: dict[str, Any] | None,
    decoder_kwargs: dict[str, Any] | None,
    projector_kwargs: dict[str, Any] | None,
    processor_kwargs: dict[str, Any] | None,
) -> VLMConfig:
    """The config to build: from an encoder + decoder pair, or a recipe with the options merged in (a trained
    zoo VLM is an error: it is loaded with `load_vlm`)."""
    if decoder is not None:
        if not isinstance(encoder, str):
            raise ConfigError("build_vlm(encoder, decoder): pass names; pass a VLMConfig alone")
        return VLMConfig(
            encoder=encoder,
            decoder=decoder,
            projector=projector or "pixel-shuffle-mlp",
            encoder_kwargs=encoder_kwargs or {},
            decoder_kwargs=decoder_kwargs or {},
            projector_kwargs=projector_kwargs or {},
            image_tokens=ImageTokenConfig.validate_dict(processor_kwargs or {}, context="processor_kwargs"),
        )
    if isinstance(encoder, VLMConfig):
        recipe = encoder
    else:
        spec = get_spec(encoder, kind="vlm")
        if spec.trained:
            raise ConfigError(
                f"{encoder!r} is a trained VLM: load it with tinyvlm.load_vlm({encoder!r}) "
                "(build_vlm assembles recipes and encoder + decoder pairs)"
            )
        recipe = spec.config  # type: ignore[assignment]
    return recipe.replace(
        projector=projector or recipe.projector,
        encoder_kwargs={**recipe.encoder_kwargs, **(encoder_kwargs or {})},
        decoder_kwargs={**recipe.decoder_kwargs, **(decoder_kwargs or {})},
        projector_kwargs={**recipe.projector_kwargs, **(projector_kwargs or {})},
        image_tokens=recipe.image_tokens.replace(**(processor_kwargs or {})),
        parts=None,  # the record of an earlier build: resolved again from the names
    )


# ---------------------------------------------------------------------------------------------- loading


def load_vlm(
    name: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> VLM:
    """A saved or trained VLM, ready for inference: a folder written by `VLM.save_pretrained` (a path or
    ``local-dir:PATH``), a Hub repo (``hf-hub:ORG/NAME[@REV]``) or a trained zoo entry, in any layout the
    registry reads (tinyvlm, SmolVLM / Idefics3, nanoVLM). Built on the meta device and loaded strictly.

    ``adapter``: a LoRA adapter folder (``tinyvlm train --lora``, or peft's ``save_pretrained``) applied to
    that base, unmerged (`tinyvlm.lora.adapter.merge_adapter` folds it in). With an adapter the base may also
    be a recipe, rebuilt from its parts' pretrained weights, when the adapter holds its trained projector.
    ``quantize`` (``"int8"`` / ``"int4"``) quantizes the decoder as it is read (a checkpoint saved quantized
    loads as it was saved; `tinyvlm.quantize`); ``threads``: intra-op threads (`tinyvlm.threads`)."""
    set_threads(threads)
    if adapter is None:
        return read_vlm(vlm_source(str(name)), dtype=dtype, device=device, quantize=quantize).prepare_for_inference()
    return with_adapter(str(name), adapter, dtype=dtype, device=device, quantize=quantize).prepare_for_inference()


def with_adapter(
    name: str, adapter: str | Path, *, dtype: torch.dtype | None, device: torch.device | str | None,
    quantize: str | None = None,
) -> VLM:
    """The base ``name`` (a checkpoint, or a recipe built from pretrained parts; quantized as it is read
    with ``quantize``) with the LoRA ``adapter`` injected and loaded (no inference step)."""
    from tinyvlm.lora.adapter import load_adapter, read_adapter_config

    saved = read_adapter_config(adapter).modules_to_save or []
    if not resolve(name, "vlm").has_files and "projector" not in saved:
        raise ConfigError(
            f"{name!r} is a recipe, whose projector is freshly initialised, and the adapter {adapter} does not hold a "
            "trained projector: give the saved VLM the adapter was trained on"
        )
    return load_adapter(open_vlm(name, dtype=dtype, device=device, quantize=quantize), adapter)


def open_vlm(name: str, *, pretrained: bool = True, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, quantize: str | None = None) -> VLM:
    """What ``--model NAME`` means: a recipe key is built (`build_vlm`), anything with files is read
    (`load_vlm` without the inference step, so that training can use it too)."""
    source = resolve(name, "vlm")
    if not source.has_files:
        return build_vlm(name, pretrained=pretrained, dtype=dtype, device=device, quantize=quantize)
    return read_vlm(source, dtype=dtype, device=device, quantize=quantize)


def vlm_source(name: str) -> Source:
    """The source of a VLM checkpoint; a recipe (no files) is a `ConfigError` pointing to `build_vlm`."""
    source = resolve(name, "vlm")
    if not source.has_files:
        raise ConfigError(f"{name!r} is a recipe (untrained): build it with tinyvlm.build_vlm({name!r})")
    return source


def vlm_family(source: Source) -> Family:
    """The VLM layout family of a checkpoint (its zoo entry's, or the one recognising its config.json)."""
    if source.spec is not None:
        return get_family(source.spec.family)
    return family_for_config(source.config_json(), "vlm", where=source.name)


def read_vlm(
    source: Source, *, dtype: torch.dtype | None, device: torch.device | str | None, quantize: str | None = None
) -> VLM:
    """Read a VLM checkpoint through its layout family: config and tokenizer, meta build, strict load. A
    checkpoint saved quantized gets its quantized modules before the load; ``quantize`` quantizes a float
    one as it is read."""
    dtype, device = parse_dtype(dtype), check_device(device)
    wanted = check_quantize(quantize, dtype=dtype, device=device)
    family = vlm_family(source)
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


def read_tinyvlm(source: Source) -> tuple[VLMConfig, Tokenizer]:
    """tinyvlm's own layout (`VLM.save_pretrained`): ``config.json`` is the `VLMConfig`; the tokenizer's
    image-token ids must be those it records."""
    config = VLMConfig.from_hf(source.config_json())
    if config.parts is None:
        raise ConfigError(f"{source.name}: config.json is a recipe, not a saved model; build it with tinyvlm.build_vlm")
    tokenizer = Tokenizer.from_folder(source.tokenizer_folder())
    tokens = config.image_tokens
    found = [tokenizer.token_to_id(t) for t in [*tokens.marker_tokens(), tokens.image_token]]
    expected = [*config.parts.marker_token_ids, config.parts.image_token_id]
    if found != expected:
        raise ConfigError(f"{source.name}: the tokenizer's image-token ids {found} differ from config.json's {expected}")
    return config, tokenizer
