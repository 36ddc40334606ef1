"""A test-only model family, so that the foundation's tests do not depend on the real families.

It has what the loader must handle: a renamed prefix, a tied head (shared Parameter, not in checkpoints),
a non-persistent buffer rebuilt by ``materialize_buffers``, and a declared-unused checkpoint key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from tinyvlm.config import Config
from tinyvlm.registry import Family
from tinyvlm.weights import KeyMap

MODEL_TYPE = "tiny-test"
VOCAB = 32


class TinyConfig(Config):
    family: ClassVar[str] = "tiny"
    dim: int = Field(8, ge=2, multiple_of=2)
    hidden: int = Field(16, ge=1)

    @classmethod
    def from_hf(cls, hf_config: dict) -> "TinyConfig":
        return cls(dim=hf_config["hidden_size"], hidden=hf_config["intermediate_size"])


class Rotary(nn.Module):
    """Owns a non-persistent buffer, as RoPE does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.half = dim // 2
        self.register_buffer("inv_freq", self.compute(None), persistent=False)

    def compute(self, device: torch.device | None) -> torch.Tensor:
        return 1.0 / 10000 ** (torch.arange(self.half, device=device, dtype=torch.float32) / self.half)

    def materialize_buffers(self, device: torch.device) -> None:
        self.inv_freq = self.compute(device)


class TinyModule(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB, config.dim)
        self.fc = nn.Linear(config.dim, config.hidden)
        self.out = nn.Linear(config.hidden, config.dim, bias=False)
        self.head = nn.Linear(config.dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.rotary = Rotary(config.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(torch.relu(self.fc(self.embed(ids)))))


def key_map(config: TinyConfig) -> KeyMap:
    return KeyMap(rename=((r"model\.(.*)", r"\1"),), unused=(r"text_tower\..*",))


FAMILY = Family("tiny", "encoder", TinyConfig, TinyModule, key_map, hf_model_types=(MODEL_TYPE,))


def checkpoint_tensors(config: TinyConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random tensors under the checkpoint's key names (the tied head is not stored)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "model.embed.weight": rand(VOCAB, config.dim),
        "model.fc.weight": rand(config.hidden, config.dim),
        "model.fc.bias": rand(config.hidden),
        "model.out.weight": rand(config.dim, config.hidden),
        "text_tower.proj.weight": rand(4, 4),  # declared unused
    }


def hf_config(config: TinyConfig) -> dict:
    return {"model_type": MODEL_TYPE, "hidden_size": config.dim, "intermediate_size": config.hidden}


def write_checkpoint(
    folder: Path,
    config: TinyConfig = TinyConfig(),
    *,
    tensors: dict | None = None,
    shards: int = 1,
    seed: int = 0,
) -> dict:
    """Write ``config.json`` + ``model.safetensors`` (or ``shards`` shards and their index) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(config, seed=seed) if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return tensors
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key] for key in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({key: name for key in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


class TinyRecipeConfig(Config):
    """A VLM recipe in the shape of `tinyvlm.vlm.VLMConfig`: the names of its encoder and decoder."""

    family: ClassVar[str] = "tiny-vlm"
    encoder: str
    decoder: str


def _build_recipe(config: TinyRecipeConfig) -> TinyModule:
    return TinyModule(TinyConfig())


#: The same module registered as a decoder (whose downloads include a tokenizer) and as a VLM recipe family.
DECODER_FAMILY = Family("tiny-decoder", "decoder", TinyConfig, TinyModule, key_map, hf_model_types=("tiny-decoder",))
RECIPE_FAMILY = Family("tiny-vlm", "vlm", TinyRecipeConfig, _build_recipe)
