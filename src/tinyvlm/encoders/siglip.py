"""SigLIP / SigLIP2 (fixed resolution) vision tower.

A plain pre-LN ViT (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training"): a conv patch
embedding plus a learned absolute position table, no CLS token, GELU-tanh MLPs and a final LayerNorm
(``post_layernorm``). SigLIP2's fixed-resolution checkpoints (Tschannen et al., 2025) use the same
architecture and the same file layout (``model_type: siglip``); only the weights and the resize filter of
their preprocessing (bilinear instead of bicubic) differ.

The attention-pooling ("MAP") head that produces SigLIP's contrastive image embedding is not built: a VLM
consumes the patch tokens. Its tensors, the text tower and the logit scalars are declared unused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator
from torch import Tensor, nn

from tinyvlm.config import Config, check_activation, require
from tinyvlm.encoders.base import Encoder
from tinyvlm.errors import ConfigError
from tinyvlm.processing.image import HALF, ImageTransform
from tinyvlm.layers import MLP, SelfAttention
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.weights import KeyMap


class SiglipConfig(Config):
    """The vision tower of a SigLIP / SigLIP2 checkpoint (field names as in ``SiglipVisionConfig``)."""

    family: ClassVar[str] = "siglip"

    hidden_size: int = Field(768, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    num_hidden_layers: int = Field(12, ge=1)
    num_attention_heads: int = Field(12, ge=1)
    image_size: int = Field(224, ge=1)
    patch_size: int = Field(16, ge=1)
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = Field(1e-6, gt=0)
    #: Resize filter of the official preprocessing: bicubic for SigLIP, bilinear for SigLIP2.
    resample: Literal["bicubic", "bilinear"] = "bicubic"

    @model_validator(mode="after")
    def _check(self) -> "SiglipConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        check_activation(self.hidden_act)
        return self

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "SiglipConfig":
        """Read a ``SiglipModel`` (``model_type: siglip``, fields under ``vision_config``) or
        ``SiglipVisionModel`` (``siglip_vision_model``, fields at the top level) ``config.json``.

        ``config.json`` does not name the resize filter; SigLIP2 checkpoints are told apart by their
        256k-token Gemma text vocabulary (SigLIP v1 has 32k), the only config difference between the two.
        """
        model_type = hf_config.get("model_type")
        if model_type == "siglip":
            vision = hf_config.get("vision_config") or {}
            text_vocab = (hf_config.get("text_config") or {}).get("vocab_size", 32000)
        elif model_type == "siglip_vision_model":
            vision, text_vocab = hf_config, 32000
        else:
            raise ConfigError(f"not a SigLIP config.json: model_type {model_type!r} (expected 'siglip')")
        for key in ("image_size", "patch_size"):
            if not isinstance(vision.get(key, 0), int):
                raise ConfigError(f"SigLIP {key}={vision[key]!r}: tinyvlm supports square images and patches only")
        require(vision, "num_channels", 3, family="siglip")
        values = {key: vision[key] for key in cls.model_fields if key in vision and key != "resample"}
        values["resample"] = "bilinear" if text_vocab >= 256000 else "bicubic"
        return cls.validate_dict(values, context="SigLIP config.json")

    @property
    def grid(self) -> int:
        """Patches per side at the training resolution (the last ``image_size % patch_size`` pixels are dropped)."""
        return self.image_size // self.patch_size


class SiglipEmbeddings(nn.Module):
    """Conv patch embedding plus the learned position table (bicubically resized for other grid sizes)."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.grid = config.grid
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.grid**2, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, h, w]
        h, w = patches.shape[-2:]
        return patches.flatten(2).transpose(1, 2) + self.positions(h, w)

    def positions(self, h: int, w: int) -> Tensor:
        """The ``[h * w, D]`` position table for an ``h`` x ``w`` grid, row-major.

        Other grids than the training one resize the table as the reference's ``interpolate_pos_encoding``:
        bicubic, ``align_corners=False``, no antialiasing (computed in fp32).
        """
        table = self.position_embedding.weight
        if (h, w) == (self.grid, self.grid):
            return table
        square = table.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(h, w), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)


class SiglipBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(Encoder):
    """SigLIP vision tower: ``[B, 3, H, W] -> [B, (H // P) * (W // P), D]`` after ``post_layernorm``."""

    num_prefix_tokens = 0

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.layers = nn.ModuleList(SiglipBlock(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        resample = Image.Resampling.BICUBIC if config.resample == "bicubic" else Image.Resampling.BILINEAR
        self.image_transform = ImageTransform(
            size=(config.image_size, config.image_size), resample=resample, mean=HALF, std=HALF, backend="pil"
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


def siglip_key_map(config: SiglipConfig) -> KeyMap:
    """All three layouts of SigLIP files: the full dual-tower ``SiglipModel`` (``vision_model.*`` plus the text
    tower and the logit scalars), a vision-only file with the ``vision_model.`` prefix (transformers v4) and
    one without it (``SiglipVisionModel.save_pretrained`` in transformers v5)."""
    prefix = r"(?:vision_model\.)?"
    return KeyMap(
        rename=(
            (prefix + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)", r"layers.\1.self_attn.o_proj.\2"),
            (prefix + r"encoder\.layers\.(\d+)\.(.+)", r"layers.\1.\2"),
            (prefix + r"(embeddings\..+|post_layernorm\..+)", r"\1"),
        ),
        unused=(
            prefix + r"head\..+",  # the attention-pooling head (contrastive image embedding)
            r"text_model\..+",
            r"logit_(scale|bias)",
        ),
    )


register_family(
    Family(
        name="siglip",
        kind="encoder",
        config_cls=SiglipConfig,
        build=SiglipEncoder,
        key_map=siglip_key_map,
        hf_model_types=("siglip", "siglip_vision_model"),
    )
)

# ------------------------------------------------------------------------------------------------- zoo

_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)

for _size in (224, 256, 384, 512):
    register_model(
        f"siglip-b16-{_size}",
        family="siglip",
        config=SiglipConfig(**_BASE, image_size=_size, resample="bicubic"),
        hub_repo=f"google/siglip-base-patch16-{_size}",
        license="apache-2.0",
        description=f"SigLIP ViT-B/16 at {_size}px, WebLI (vision tower; {(_size // 16) ** 2} tokens of 768)",
    )
    register_model(
        f"siglip2-b16-{_size}",
        family="siglip",
        config=SiglipConfig(**_BASE, image_size=_size, resample="bilinear"),
        hub_repo=f"google/siglip2-base-patch16-{_size}",
        license="apache-2.0",
        description=f"SigLIP2 ViT-B/16 at {_size}px, fixed resolution (vision tower; {(_size // 16) ** 2} tokens of 768)",
    )

register_model(
    "siglip-so400m-p14-384",
    family="siglip",
    config=SiglipConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        resample="bicubic",
    ),
    hub_repo="google/siglip-so400m-patch14-384",
    license="apache-2.0",
    description="SigLIP So400m/14 at 384px (vision tower; 27x27 = 729 tokens of 1152, the last 6 px are unused)",
)

register_model(
    "test-siglip",
    family="siglip",
    config=SiglipConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8
    ),
    license="apache-2.0",
    description="Tiny random-init SigLIP-shaped encoder (8x8 tokens of 64) for tests and the CPU demo",
)
