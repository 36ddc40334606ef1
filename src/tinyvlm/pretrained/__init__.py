"""Trained VLMs published by other projects, loaded into tinyvlm's own parts.

* `tinyvlm.pretrained.smolvlm`: SmolVLM / SmolVLM2 (transformers' Idefics3 / SmolVLM checkpoints).
* `tinyvlm.pretrained.nanovlm`: nanoVLM checkpoints (its own flat config.json and key layout).

`tinyvlm.load_vlm` hands them here (zoo key, ``hf-hub:`` repo or ``local-dir:`` folder) through `load_foreign`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tinyvlm.vlm import VLM

#: Zoo families whose entries are loaded here.
FAMILIES = ("smolvlm", "nanovlm")


def load_foreign(name: str, *, dtype: "torch.dtype | None", device: "torch.device | str | None") -> "VLM | None":
    """The VLM ``name`` names when it is a SmolVLM or nanoVLM checkpoint (a trained zoo entry of theirs, a Hub
    repo or a folder in their layout); None for anything else (a tinyvlm save, a recipe, ...)."""
    from tinyvlm.errors import UnknownModelError
    from tinyvlm.hub import HF_HUB, LOCAL_DIR, model_folder, parse_name, read_config
    from tinyvlm.pretrained import nanovlm, smolvlm

    if name.startswith((HF_HUB, LOCAL_DIR)):
        source = parse_name(name, "vlm")
    elif Path(name).expanduser().is_dir() and (Path(name).expanduser() / "config.json").is_file():
        source = parse_name(LOCAL_DIR + name, "vlm")
    else:
        try:
            source = parse_name(name, "vlm")
        except UnknownModelError:
            return None
        if source.spec is None or source.spec.family not in FAMILIES:
            return None
    hf = read_config(model_folder(source, weights=False))
    if hf.get("model_type") in smolvlm.MODEL_TYPES:
        folder = model_folder(source, weights=True, tokenizer=True)
        return smolvlm.load(folder, hf, name=name, dtype=dtype, device=device)
    if nanovlm.is_nanovlm_config(hf):
        folder = model_folder(source, weights=True)  # the tokenizer is lm_tokenizer's, fetched by the loader
        return nanovlm.load(folder, hf, name=name, dtype=dtype, device=device)
    return None
