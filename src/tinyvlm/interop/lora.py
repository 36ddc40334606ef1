"""LoRA adapters on a `tinyvlm.vlm.VLM`, through peft, in peft's own file format.

`add_lora` injects fresh LoRA layers (``peft.inject_adapter_in_model``: the VLM keeps its class, its
methods and its module names; each target ``nn.Linear`` becomes a peft ``lora.Linear`` holding it as
``base_layer``). `save_adapter` writes what `PeftModel.save_pretrained` writes for the same module:

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
  ``[out, r]`` (the adapter name removed), plus every tensor of the parts trained in full
  (``modules_to_save``, the projector by default) as ``base_model.model.<part>.<tensor>``; metadata
  ``{"format": "pt"}``;
* ``adapter_config.json``: peft's `LoraConfig` as its ``save_pretrained`` writes it (sorted keys,
  ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules`` (one regular expression), ``modules_to_save``,
  ``use_rslora``, ``base_model_name_or_path``, ``revision``, ``peft_version``, ...) with the ``auto_mapping`` of
  a custom module (``VLM`` of ``tinyvlm.vlm.model``).

So ``PeftModel.from_pretrained(vlm, folder)`` reads a tinyvlm adapter, and `load_adapter` reads an adapter
that peft saved for a tinyvlm VLM. On a quantized base (QLoRA) the target layers are not ``nn.Linear``; they
get `tinyvlm.interop.qlora.QuantLoraLinear`, peft's LoRA layer registered for their type. `merge_adapter` folds ``W + scale * B A`` into each base layer
(``scale = alpha / r``, or ``alpha / sqrt(r)`` with rslora) and removes the LoRA layers.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from safetensors.torch import save_file

from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.interop.lora_settings import LoraSettings, target_pattern
from tinyvlm.registry import get_spec
from tinyvlm.sources import ADAPTER_CONFIG, Source, resolve
from tinyvlm.vlm.files import check_target, swap_into_place
from tinyvlm.vlm.model import VLM
from tinyvlm.weights import open_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix of every saved key: ``PeftModel.base_model`` (the LoraModel) ``.model`` (the VLM).
PREFIX = "base_model.model."
#: The adapter name peft uses inside modules (``lora_A.default``); files never contain it.
ADAPTER_NAME = "default"
#: The parts a VLM adapter may save in full (peft's ``modules_to_save``).
VLM_PARTS = ("encoder", "projector", "decoder")
#: ``init_lora_weights`` values that only initialise A and B; the others (PiSSA, OLoRA, LoftQ, ...) also
#: rewrite the base weights, so the adapter does not apply to the original base model.
PLAIN_INITS = (True, False, "gaussian")


def require_peft() -> ModuleType:
    """The peft package, or a `ConfigError` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError('LoRA needs peft, an optional dependency: pip install "tinyvlm[lora]"') from None
    return peft


def has_adapter(module: nn.Module) -> bool:
    """Whether ``module`` (a VLM or one of its parts) holds LoRA layers (injected and not merged)."""
    return bool(getattr(module, "peft_config", None)) or any(is_lora_layer(m) for m in module.modules())


def is_lora_layer(module: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no peft layer exists before peft is imported (and peft stays optional)
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def adapter_config(vlm: nn.Module) -> Any:
    """The peft `LoraConfig` of the VLM's adapter."""
    if not has_adapter(vlm):
        raise ConfigError("this VLM has no LoRA adapter (add one with tinyvlm.interop.lora.add_lora or load_vlm(..., adapter=))")
    return vlm.peft_config[ADAPTER_NAME]


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``module`` by name (the name of the layer they replaced)."""
    return {name: sub for name, sub in module.named_modules() if is_lora_layer(sub)}


def saved_parts(vlm: nn.Module) -> list[str]:
    """The parts the adapter holds in full (``modules_to_save``)."""
    return list(adapter_config(vlm).modules_to_save or [])


# ------------------------------------------------------------------------------------------------ adding


def add_lora(
    vlm: VLM,
    settings: LoraSettings,
    *,
    full_parts: Sequence[str] = ("projector",),
    base_name: str | None = None,
    base_revision: str | None = None,
) -> VLM:
    """Inject fresh LoRA layers into ``vlm`` in place (random A, zero B: the outputs are unchanged) and make
    only them and the ``full_parts`` (trained in full, saved with the adapter) trainable. ``base_name`` and
    ``base_revision`` are recorded in ``adapter_config.json`` (``base_model_name_or_path``, ``revision``)."""
    peft = require_peft()
    if has_adapter(vlm):
        raise ConfigError("this VLM already has a LoRA adapter; merge it first (tinyvlm.interop.lora.merge_adapter)")
    overlap = sorted(set(full_parts) & set(settings.parts))
    if overlap:
        raise ConfigError(f"{', '.join(overlap)}: a part is either trained in full or adapted with LoRA, not both")
    unknown = sorted(set(full_parts) - set(VLM_PARTS))
    if unknown:
        raise ConfigError(f"full_parts {unknown}: the parts of a VLM are {', '.join(VLM_PARTS)}")
    modules = dict(vlm.named_modules())
    names = [name for name in settings.target_modules(modules) if is_linear(modules[name])]
    if not names:
        raise ConfigError(
            f"LoRA targets {','.join(settings.targets)} match no linear layer of the {' and '.join(settings.parts)}"
        )
    pattern = target_pattern(names)
    assert [name for name in modules if re.fullmatch(pattern, name)] == names, f"{pattern} matches other layers"
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        use_rslora=settings.rslora,
        bias="none",
        base_model_name_or_path=base_name,
        revision=base_revision,
    )
    register_quantized_layers(config, vlm)
    peft.inject_adapter_in_model(config, vlm, adapter_name=ADAPTER_NAME)
    # Recorded for the files only: peft would otherwise wrap these parts in copies (ModulesToSaveWrapper).
    config.modules_to_save = [part for part in VLM_PARTS if part in full_parts] or None
    for part in full_parts:
        getattr(vlm, part).requires_grad_(True)
    return vlm


def rebuildable_base(source: Source, *, pretrained: bool, full_parts: Sequence[str]) -> tuple[str, str | None]:
    """How an adapter names its base VLM (``base_model_name_or_path``, ``revision``), after checking that
    `tinyvlm.load_vlm` can rebuild that base exactly: a saved or trained VLM always; a recipe only from its
    parts' pretrained weights, with its freshly initialised projector trained (and so saved with the adapter)."""
    name = source.name
    if source.has_files:
        if source.local_dir is not None:
            return str(source.local_dir.resolve()), None
        return name, source.commit
    assert source.spec is not None, "a name without files is a zoo entry"
    recipe = get_spec(source.spec.key, kind="vlm").config
    problems = []
    if not pretrained:
        problems.append("pretrained is off, so its parts are random-init")
    for part in ("encoder", "decoder"):
        part_name = getattr(recipe, part)
        if part not in full_parts and not resolve(part_name, part).has_files:
            problems.append(f"its {part} {part_name!r} has no weights (random-init)")
    if "projector" not in full_parts:
        problems.append("its projector is freshly initialised but not trained (add projector to train)")
    if problems:
        raise ConfigError(
            f"a LoRA adapter applies to a base that tinyvlm.load_vlm can rebuild, and the recipe {name!r} cannot be "
            f"rebuilt: {'; '.join(problems)}. Save the base first (tinyvlm.build_vlm(...).save_pretrained(DIR)) "
            "and train with model=DIR"
        )
    return name, None


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a layer standing for one (a quantized linear: integer ``in_features`` and
    ``out_features``, computing ``x W^T (+ b)``)."""
    if isinstance(module, nn.Linear):
        return True
    return all(isinstance(getattr(module, name, None), int) for name in ("in_features", "out_features"))


def quantized_linear_types(module: nn.Module) -> set[type]:
    """The types of the linear-like layers of ``module`` that are not ``nn.Linear`` (nor peft's LoRA layers)."""
    return {type(m) for m in module.modules() if is_linear(m) and not isinstance(m, nn.Linear) and not is_lora_layer(m)}


def register_quantized_layers(config: Any, vlm: nn.Module) -> None:
    """Give the quantized linears of ``vlm`` (if any) peft's LoRA layer, registered in ``config`` by type."""
    kinds = quantized_linear_types(vlm)
    if kinds:
        from tinyvlm.interop.qlora import QuantLoraLinear  # imports peft, an optional dependency

        config._register_custom_module({kind: QuantLoraLinear for kind in kinds})


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (a tied tensor counted once)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------ saving


def adapter_state_dict(vlm: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under the names peft saves them: LoRA A / B (peft's own
    ``get_peft_model_state_dict``) and the full parts, all behind ``base_model.model.``."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers="auto" (peft's default) would look the base up on the Hub to see whether its
    # vocabulary changed; LoRA never targets embeddings here (full parts are saved below).
    lora = get_peft_model_state_dict(vlm, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    tensors = {PREFIX + key: value for key, value in lora.items()}
    for part in saved_parts(vlm):
        for key, value in getattr(vlm, part).state_dict().items():
            tensors[f"{PREFIX}{part}.{key}"] = value
    return {key: value.detach().contiguous().cpu() for key, value in tensors.items()}


def write_adapter_files(vlm: nn.Module, folder: Path) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` into the existing ``folder`` (not atomic:
    `save_adapter` and the training checkpoints write into a temporary folder)."""
    config = copy.deepcopy(adapter_config(vlm))
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    save_file(adapter_state_dict(vlm), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cls = type(vlm)
    config.save_pretrained(str(folder), auto_mapping_dict={"base_model_class": cls.__name__,
                                                           "parent_library": cls.__module__})


def save_adapter(vlm: nn.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, atomically (a
    temporary folder next to it, renamed into place once complete); ``overwrite`` replaces an adapter saved
    there (`tinyvlm.vlm.files.check_target`)."""
    folder = Path(folder)
    adapter_config(vlm)  # the error when there is none, before touching the disk
    check_target(folder, overwrite=overwrite, holds=ADAPTER_CONFIG)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
    try:
        write_adapter_files(vlm, staging)
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------------------------- loading


def read_adapter_config(folder: str | Path) -> Any:
    """The peft `LoraConfig` of an adapter folder, refusing what tinyvlm cannot apply exactly."""
    peft = require_peft()
    path = Path(folder) / ADAPTER_CONFIG
    try:
        values = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"{folder} has no {ADAPTER_CONFIG}: not a LoRA adapter folder (tinyvlm train --lora, "
                          "or peft's save_pretrained, writes one)") from None
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    if values.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type {values.get('peft_type')!r}; tinyvlm reads LoRA adapters (LORA) only")
    problems = []
    if values.get("use_dora"):
        problems.append("use_dora (DoRA)")
    if values.get("bias", "none") != "none" or values.get("lora_bias"):
        problems.append(f"bias={values.get('bias')!r} / lora_bias (trained biases)")
    if values.get("init_lora_weights", True) not in PLAIN_INITS:
        problems.append(f"init_lora_weights={values['init_lora_weights']!r}, which rewrites the base weights")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if values.get(key):
            problems.append(key)
    parts = values.get("modules_to_save") or []
    if any(part not in VLM_PARTS for part in parts):
        problems.append(f"modules_to_save {parts} (tinyvlm saves whole parts: {', '.join(VLM_PARTS)})")
    if problems:
        raise ConfigError(f"{path}: tinyvlm applies plain LoRA adapters; this one uses {'; '.join(problems)}")
    config = peft.LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    return config


def load_adapter(vlm: VLM, folder: str | Path) -> VLM:
    """Inject the adapter saved in ``folder`` into ``vlm`` (in place) and load its tensors strictly: every
    tensor of the file fills a LoRA weight or a tensor of a saved part, and every one of those is filled. The
    result is frozen (``requires_grad`` False), in eval mode, with the adapter unmerged."""
    peft = require_peft()
    if has_adapter(vlm):
        raise ConfigError("this VLM already has a LoRA adapter; merge it first (tinyvlm.interop.lora.merge_adapter)")
    config = read_adapter_config(folder)
    parts = list(config.modules_to_save or [])
    injected = copy.deepcopy(config)
    # The saved parts are loaded into the parts themselves, not into the copies peft would wrap them in; as
    # peft does, no LoRA layer goes inside them.
    injected.modules_to_save = None
    injected.exclude_modules = _excluding(config.exclude_modules, parts)
    register_quantized_layers(injected, vlm)
    try:
        peft.inject_adapter_in_model(injected, vlm, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # peft's "Target modules ... not found in the base model"
        raise WeightsError(f"the adapter in {folder} does not fit this VLM: {error}") from None
    injected.modules_to_save, injected.exclude_modules = parts or None, config.exclude_modules
    vlm.peft_config[ADAPTER_NAME] = injected
    load_adapter_weights(vlm, folder)
    vlm.requires_grad_(False)
    return vlm.eval()


def _excluding(exclude: str | list[str] | set[str] | None, parts: list[str]) -> str | list[str] | set[str] | None:
    """peft's ``exclude_modules`` (a regular expression, fully matched, or names matched exactly or as a
    ``.suffix``) extended by the ``parts`` and everything inside them."""
    if not parts:
        return exclude
    patterns = [rf"(?:.*\.)?(?:{'|'.join(map(re.escape, parts))})(?:\..*)?"]
    if isinstance(exclude, str):
        patterns.append(exclude)
    elif exclude:
        patterns += [rf"(?:.*\.)?{re.escape(name)}" for name in exclude]
    return "|".join(f"(?:{pattern})" for pattern in patterns)


def _module_key(key: str) -> str | None:
    """The module tensor a saved key fills (peft's names with the adapter name put back), or None when it
    lacks peft's prefix."""
    if not key.startswith(PREFIX):
        return None
    key = key[len(PREFIX) :]
    return re.sub(r"\.(lora_A|lora_B)\.weight$", rf".\1.{ADAPTER_NAME}.weight", key)


def load_adapter_weights(vlm: nn.Module, folder: str | Path) -> None:
    """Copy the tensors of ``folder``'s ``adapter_model.safetensors`` into the VLM's adapter in place (the
    parameters stay the same objects, so an optimizer holding them stays valid: resuming uses this)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{folder} has no {ADAPTER_WEIGHTS}")
    expected = {name: tensor for name, tensor in vlm.state_dict(keep_vars=True).items()
                if re.search(rf"\.lora_[AB]\.{ADAPTER_NAME}\.weight$", name)}
    for part in saved_parts(vlm):
        expected.update({f"{part}.{key}": t for key, t in getattr(vlm, part).state_dict(keep_vars=True).items()})
    filled, unexpected, mismatched = set(), [], []
    with open_safetensors(path) as handle, torch.no_grad():
        for key in handle.keys():
            target = _module_key(key)
            if target not in expected:
                unexpected.append(key)
                continue
            tensor = handle.get_tensor(key)
            if tuple(tensor.shape) != tuple(expected[target].shape):
                mismatched.append(f"{key}: adapter {list(tensor.shape)}, model {list(expected[target].shape)}")
                continue
            expected[target].copy_(tensor)
            filled.add(target)
    missing = [name for name in expected if name not in filled]
    sections = [("missing from the adapter", missing), ("unexpected in the adapter", unexpected),
                ("shape mismatches", mismatched)]
    problems = "\n".join(f"  {title} ({len(items)}): {', '.join(items[:20])}" for title, items in sections if items)
    if problems:
        raise WeightsError(f"adapter {path} does not fit this VLM:\n{problems}")


# ----------------------------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_adapter(vlm: VLM) -> VLM:
    """Fold the adapter into the base weights (``W += scale * B A``, peft's own merge) and put the plain base
    layers back: the result is an ordinary VLM (``save_pretrained`` writes a plain model)."""
    adapter_config(vlm)  # the error when there is none
    for name, layer in lora_layers(vlm).items():
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, leaf = name.rpartition(".")
        setattr(vlm.get_submodule(parent_name) if parent_name else vlm, leaf, layer.get_base_layer())
    del vlm.peft_config
    return vlm
