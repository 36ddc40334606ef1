"""What a LoRA run adapts: rank, scale, target layers and parts. Torch-free (the training config uses it).

Target names are the short names of ``--lora-targets``; each maps onto the module names the families use:

========  ==========================================  ==========================================
target    decoders (Llama, Gemma-3)                    encoders (SigLIP; DINOv3)
========  ==========================================  ==========================================
``q``     ``self_attn.q_proj``                        ``self_attn.q_proj`` (``attention.q_proj``)
``k``     ``self_attn.k_proj``                        ``self_attn.k_proj`` (``attention.k_proj``)
``v``     ``self_attn.v_proj``                        ``self_attn.v_proj`` (``attention.v_proj``)
``o``     ``self_attn.o_proj``                        ``self_attn.o_proj`` (``attention.o_proj``)
``gate``  ``mlp.gate_proj``                           ``mlp.gate_proj`` (gated MLPs only: DINOv3+)
``up``    ``mlp.up_proj``                             ``mlp.fc1`` (``mlp.up_proj`` when gated)
``down``  ``mlp.down_proj``                           ``mlp.fc2`` (``mlp.down_proj`` when gated)
========  ==========================================  ==========================================

A target a part does not have (``gate`` on SigLIP's plain MLP) is skipped in that part; one that no chosen
part has is an error. The matched modules are written to ``adapter_config.json`` as one regular expression
(peft ``re.fullmatch``es a string ``target_modules`` against every module name).
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Iterable

from pydantic import Field, field_validator

from tinyvlm.config import Config

#: ``--lora-targets`` names -> (the block submodules they live in, the leaf module names).
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "q": (("self_attn", "attention"), ("q_proj",)),
    "k": (("self_attn", "attention"), ("k_proj",)),
    "v": (("self_attn", "attention"), ("v_proj",)),
    "o": (("self_attn", "attention"), ("o_proj",)),
    "gate": (("mlp",), ("gate_proj",)),
    "up": (("mlp",), ("up_proj", "fc1")),
    "down": (("mlp",), ("down_proj", "fc2")),
}
#: Parts LoRA can adapt (the projector is small: it is trained in full, or frozen).
PARTS = ("encoder", "decoder")
DEFAULT_TARGETS = "q,k,v,o,gate,up,down"
DEFAULT_PARTS = "decoder"


def parse_names(spec: str, valid: Iterable[str], *, what: str) -> tuple[str, ...]:
    """``'q, v'`` -> ``('q', 'v')`` in the order of ``valid``; an unknown or empty list is a ValueError."""
    valid = tuple(valid)
    names = {name.strip() for name in spec.split(",") if name.strip()}
    unknown = sorted(names - set(valid))
    if unknown or not names:
        raise ValueError(f"{what}={spec!r}: expected a comma list of {', '.join(valid)}")
    return tuple(name for name in valid if name in names)


class LoraSettings(Config):
    """A LoRA adapter to train: ``W x + (alpha / r) B A x`` on each target linear layer (``alpha / sqrt(r)``
    with ``rslora``), A ``[r, in]`` random (peft's Kaiming-uniform init), B ``[out, r]`` zero, so training
    starts from the base model's outputs."""

    family: ClassVar[str] = "lora"

    rank: int = Field(ge=1)
    #: None: the rank (scale 1).
    alpha: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: tuple[str, ...] = tuple(TARGETS)
    parts: tuple[str, ...] = (DEFAULT_PARTS,)
    rslora: bool = False

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        return parse_names(",".join(targets), TARGETS, what="targets")

    @field_validator("parts")
    @classmethod
    def _known_parts(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        return parse_names(",".join(parts), PARTS, what="parts")

    @property
    def lora_alpha(self) -> int:
        return self.rank if self.alpha is None else self.alpha

    @property
    def scale(self) -> float:
        """The factor of ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora (as peft computes it)."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def target_modules(self, module_names: Iterable[str]) -> list[str]:
        """The names among ``module_names`` (a VLM's ``named_modules``) that this adapter targets: the chosen
        linear layers of the transformer blocks of the chosen parts."""
        pattern = re.compile(rf"({'|'.join(self.parts)})\.layers\.\d+\.(\w+)\.(\w+)")
        chosen = []
        for name in module_names:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            _, block, leaf = match.groups()
            if any(block in blocks and leaf in leaves for blocks, leaves in (TARGETS[t] for t in self.targets)):
                chosen.append(name)
        return chosen


def target_pattern(names: Iterable[str]) -> str:
    """One regular expression that fully matches exactly ``names`` up to the layer index: the names with
    ``layers.N`` generalised, grouped by block (``decoder\\.layers\\.\\d+\\.self_attn\\.(?:q_proj|v_proj)``)."""
    forms: dict[str, list[str]] = {}
    for name in names:
        head, _, leaf = re.sub(r"\.layers\.\d+\.", ".layers.#.", name).rpartition(".")
        forms.setdefault(head, [])
        if leaf not in forms[head]:
            forms[head].append(leaf)
    alternatives = []
    for head, leaves in forms.items():
        prefix = re.escape(head).replace("\\#", r"\d+").replace("#", r"\d+")
        alternatives.append(prefix + r"\." + (leaves[0] if len(leaves) == 1 else f"(?:{'|'.join(leaves)})"))
    return "|".join(alternatives)
