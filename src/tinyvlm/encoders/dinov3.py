"""DINOv3 ViT (Siméoni et al., 2025, "DINOv3").

A pre-LN ViT with a CLS token and register tokens but no absolute position embedding: positions enter
through a 2-D rotary embedding of the patch tokens, recomputed for every input grid, so any input whose
sides are multiples of the patch size works (rectangular included). Each residual branch is scaled by a
learned per-channel LayerScale; the MLP is GELU (ViT-S/B/L) or SwiGLU (ViT-S+).

2-D RoPE, as the reference computes it: the centre of patch (r, c) of an h x w grid gets coordinates
``y = 2 (r + 1/2) / h - 1`` and ``x = 2 (c + 1/2) / w - 1`` (each axis normalised on its own). With
``f_k = theta^(-4k / head_dim)`` for ``k < head_dim / 4``, the angles are ``2 pi [y f, x f]`` tiled twice to
``head_dim`` and applied to q and k of the patch tokens in rotate-half form; CLS and registers are not
rotated, nor is v.

DINOv3 pretraining randomly rescales the RoPE coordinates in training mode (``pos_embed_rescale``); tinyvlm
never does, so the encoder computes the same function in train and eval mode (fine-tuning inside a VLM
should not see random positions).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import Tensor, nn

from tinyvlm.config import Config, check_activation, require
from tinyvlm.encoders.base import Encoder
from tinyvlm.errors import ConfigError
from tinyvlm.processing.image import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from tinyvlm.layers import MLP, GatedMLP, LayerScale, SelfAttention
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.weights import KeyMap


class DINOv3Config(Config):
    """A DINOv3 ViT (field names as in ``DINOv3ViTConfig``)."""

    family: ClassVar[str] = "dinov3"

    hidden_size: int = Field(384, ge=1)
    intermediate_size: int = Field(1536, ge=1)
    num_hidden_layers: int = Field(12, ge=1)
    num_attention_heads: int = Field(6, ge=1)
    #: The resolution the checkpoint was trained at, and the size `preprocess` resizes to.
    image_size: int = Field(224, ge=1)
    patch_size: int = Field(16, ge=1)
    num_register_tokens: int = Field(4, ge=0)
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    layer_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(100.0, gt=0)
    #: The released LVD-1689M checkpoints have no key bias (the original's is masked to zero).
    key_bias: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DINOv3Config":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("the head dimension must be a multiple of 4 for the 2-D RoPE")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_activation(self.hidden_act)
        return self

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "DINOv3Config":
        """Read a ``DINOv3ViTModel`` ``config.json`` (``model_type: dinov3_vit``).

        ``pos_embed_shift`` / ``pos_embed_jitter`` / ``pos_embed_rescale`` (training-time RoPE augmentation),
        dropout rates and the backbone options are accepted and ignored: they do not change inference.
        """
        if hf_config.get("model_type") != "dinov3_vit":
            raise ConfigError(f"not a DINOv3 config.json: model_type {hf_config.get('model_type')!r}")
        for key in ("image_size", "patch_size"):
            if not isinstance(hf_config.get(key, 0), int):
                raise ConfigError(f"DINOv3 {key}={hf_config[key]!r}: tinyvlm supports square sizes only")
        for key, expected in (
            ("num_channels", 3),
            ("query_bias", True),
            ("value_bias", True),
            ("proj_bias", True),
            ("mlp_bias", True),
        ):
            require(hf_config, key, expected, family="dinov3")
        values = {key: hf_config[key] for key in cls.model_fields if key in hf_config}
        values.setdefault("num_register_tokens", 0)  # the transformers default, unlike ours
        return cls.validate_dict(values, context="DINOv3 config.json")


class DINOv3Embeddings(nn.Module):
    """Conv patch embedding, then ``[CLS, registers, patches]``."""

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        dim = config.hidden_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, config.num_register_tokens, dim) * 0.02)
        self.patch_embeddings = nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.weight.dtype)).flatten(2).transpose(1, 2)
        B = patches.shape[0]
        return torch.cat([self.cls_token.expand(B, -1, -1), self.register_tokens.expand(B, -1, -1), patches], dim=1)


def rope_2d(h: int, w: int, head_dim: int, theta: float, prefix: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` tables ``[prefix + h * w, head_dim]`` (fp32) for the 2-D RoPE of an ``h`` x ``w`` grid.

    The first ``prefix`` rows (CLS, registers) are the identity rotation (cos 1, sin 0), so one
    `apply_rotary` call over the whole sequence leaves those tokens untouched.
    """
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)  # [head_dim / 4]
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # [h*w, 2]
    angles = (2 * math.pi * coords[:, :, None] * inv_freq).flatten(1).tile(2)  # [h*w, head_dim]: y, x, y, x
    ones, zeros = torch.ones(prefix, head_dim, device=device), torch.zeros(prefix, head_dim, device=device)
    return torch.cat([ones, angles.cos()]), torch.cat([zeros, angles.sin()])


class DINOv3Block(nn.Module):
    """``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        dim, hidden = config.hidden_size, config.intermediate_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SelfAttention(dim, config.num_attention_heads, key_bias=config.key_bias)
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if config.use_gated_mlp:
            self.mlp: nn.Module = GatedMLP(dim, hidden, config.hidden_act, bias=True)
        else:
            self.mlp = MLP(dim, hidden, config.hidden_act)
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x + lambda1 * branch, as one fused op (addcmul) instead of a multiply and an add
        x = torch.addcmul(x, self.layer_scale1.lambda1, self.attention(self.norm1(x), (cos, sin)))
        return torch.addcmul(x, self.layer_scale2.lambda1, self.mlp(self.norm2(x)))


class DINOv3Encoder(Encoder):
    """DINOv3 ViT: ``[B, 3, H, W] -> [B, (H // P) * (W // P), D]`` after the final norm, CLS and registers
    removed (``num_prefix_tokens = 1 + registers``). H and W must be multiples of the patch size."""

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        self.config = config
        self.num_prefix_tokens = 1 + config.num_register_tokens
        self.embeddings = DINOv3Embeddings(config)
        self.layers = nn.ModuleList(DINOv3Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.image_transform = ImageTransform(
            size=(config.image_size, config.image_size),
            resample=Image.Resampling.BILINEAR,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            backend="torch",
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        H, W = pixel_values.shape[-2:]
        P = self.config.patch_size
        if H % P or W % P:
            raise ConfigError(f"DINOv3 needs image sides that are multiples of {P}, got {H}x{W}; resize first")
        x = self.embeddings(pixel_values)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_2d(H // P, W // P, head_dim, self.config.rope_theta, self.num_prefix_tokens, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)[:, self.num_prefix_tokens :]


def dinov3_key_map(config: DINOv3Config) -> KeyMap:
    """DINOv3 files have no prefix and keep ``layer.{i}`` on disk (transformers v5 renames it in memory only)."""
    # the plain MLP is tinyvlm's `MLP` (fc1 / fc2); the gated one keeps the checkpoint's names
    plain_mlp = (
        (r"layer\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.mlp.fc1.\2"),
        (r"layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"layers.\1.mlp.fc2.\2"),
    )
    return KeyMap(
        rename=(
            *(() if config.use_gated_mlp else plain_mlp),
            (r"layer\.(\d+)\.(.+)", r"layers.\1.\2"),
            (r"(embeddings\.(?:cls_token|register_tokens|patch_embeddings\..+)|norm\..+)", r"\1"),
        ),
        unused=(r"embeddings\.mask_token",),  # replaces masked patches in pretraining only
    )


register_family(
    Family(
        name="dinov3",
        kind="encoder",
        config_cls=DINOv3Config,
        build=DINOv3Encoder,
        key_map=dinov3_key_map,
        hf_model_types=("dinov3_vit",),
    )
)

# ------------------------------------------------------------------------------------------------- zoo

_LICENSE = "dinov3-license"
_GATED = "gated: accept the DINOv3 license on the Hub page, then set HF_TOKEN"

register_model(
    "dinov3-vits16",
    family="dinov3",
    config=DINOv3Config(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    hub_repo="facebook/dinov3-vits16-pretrain-lvd1689m",
    license=_LICENSE,
    gated=True,
    description=f"DINOv3 ViT-S/16 distilled, LVD-1689M (tokens of 384; {_GATED})",
)
register_model(
    "dinov3-vits16plus",
    family="dinov3",
    config=DINOv3Config(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        hidden_act="silu",
        use_gated_mlp=True,
    ),
    hub_repo="facebook/dinov3-vits16plus-pretrain-lvd1689m",
    license=_LICENSE,
    gated=True,
    description=f"DINOv3 ViT-S+/16 distilled (SwiGLU MLP), LVD-1689M (tokens of 384; {_GATED})",
)
register_model(
    "dinov3-vitb16",
    family="dinov3",
    config=DINOv3Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    hub_repo="facebook/dinov3-vitb16-pretrain-lvd1689m",
    license=_LICENSE,
    gated=True,
    description=f"DINOv3 ViT-B/16 distilled, LVD-1689M (tokens of 768; {_GATED})",
)
register_model(
    "dinov3-vitl16",
    family="dinov3",
    config=DINOv3Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    hub_repo="facebook/dinov3-vitl16-pretrain-lvd1689m",
    license=_LICENSE,
    gated=True,
    description=f"DINOv3 ViT-L/16 distilled, LVD-1689M (tokens of 1024; {_GATED})",
)
register_model(
    "test-dinov3",
    family="dinov3",
    config=DINOv3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        num_register_tokens=4,
        hidden_act="silu",
        use_gated_mlp=True,
    ),
    license="apache-2.0",
    description="Tiny random-init DINOv3-shaped encoder (registers, SwiGLU; 8x8 tokens of 64) for tests and the demo",
)
