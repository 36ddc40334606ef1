"""nanoVLM's model, reimplemented from its published code layout, as the reference for the nanoVLM loader.

nanoVLM (github.com/huggingface/nanoVLM) is not a package and is not installed here, so this file rebuilds
its modules with the same attribute names (hence the same safetensors keys, written with
``safetensors.torch.save_model`` exactly as ``VisionLanguageModel.save_pretrained`` does) and the same math,
following ``models/{vision_transformer,language_model,modality_projector,vision_language_model}.py`` of its
v0.1 tag (the code of ``lusxvr/nanoVLM-222M``) and the appendix of ``prior-art-nanovlm.md``:

* ``vision_encoder``: SigLIP-style ViT. Conv patch embedding, a ``[1, N, D]`` position parameter, pre-LN
  blocks with a fused ``qkv_proj`` (q, k, v stacked in that order, with bias), GELU-tanh MLP, final
  LayerNorm over all tokens (no CLS token).
* ``MP``: pixel shuffle (``[B, h/s, s, w/s, s, D] -> [B, h/s, w/s, s, s, D]``) then one bias-free Linear.
* ``decoder``: Llama. RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``, rotate-half RoPE with ``inv_freq =
  base^(-2i/d)`` over ``cat(freqs, freqs)``, GQA by ``repeat_interleave``, SiLU-gated MLP, final norm, head
  tied to the token embedding when ``lm_tie_weights``.
* the VLM (v0.1): image embeddings are concatenated *before* the prompt's token embeddings; generation is
  greedy over the head of the last position, recomputing the whole sequence each step (nanoVLM's path
  without KV cache).

Written independently of tinyvlm's own modules on purpose: it is what tinyvlm's nanoVLM loader is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class NanoConfig:
    vit_hidden_dim: int = 32
    vit_inter_dim: int = 64
    vit_patch_size: int = 4
    vit_img_size: int = 32
    vit_n_heads: int = 4
    vit_n_blocks: int = 2
    vit_ln_eps: float = 1e-6
    lm_hidden_dim: int = 48
    lm_inter_dim: int = 96
    lm_rms_eps: float = 1e-5
    lm_re_base: int = 100000
    lm_max_position_embeddings: int = 8192
    lm_vocab_size: int = 300
    lm_n_heads: int = 4
    lm_n_kv_heads: int = 2
    lm_n_blocks: int = 2
    lm_tie_weights: bool = True
    mp_pixel_shuffle_factor: int = 2


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        n = (cfg.vit_img_size // cfg.vit_patch_size) ** 2
        self.conv = nn.Conv2d(3, cfg.vit_hidden_dim, cfg.vit_patch_size, stride=cfg.vit_patch_size, padding="valid")
        self.position_embedding = nn.Parameter(torch.rand(1, n, cfg.vit_hidden_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).flatten(2).transpose(1, 2)
        return x + self.position_embedding


class ViTMultiHeadAttention(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.qkv_proj = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim, bias=True)
        self.out_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ViTMLP(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTBlock(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTMultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.patch_embedding = ViTPatchEmbeddings(cfg)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.vit_n_blocks))
        self.layer_norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embedding(x)
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x)


class ModalityProjector(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.scale_factor**2, cfg.lm_hidden_dim, bias=False)

    def pixel_shuffle(self, x: Tensor) -> Tensor:
        bsz, seq, embed_dim = x.size()
        side = int(seq**0.5)
        s = self.scale_factor
        x = x.view(bsz, side, side, embed_dim).reshape(bsz, side // s, s, side // s, s, embed_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.reshape(bsz, (side // s) ** 2, embed_dim * s * s)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pixel_shuffle(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LanguageModelGroupedQueryAttention(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.lm_n_heads, cfg.lm_n_kv_heads
        self.head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        d = cfg.lm_hidden_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, self.head_dim * self.n_kv_heads, bias=False)
        self.v_proj = nn.Linear(d, self.head_dim * self.n_kv_heads, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class LanguageModelMLP(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LanguageModelBlock(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.mlp = LanguageModelMLP(cfg)
        self.attn = LanguageModelGroupedQueryAttention(cfg)
        self.norm1 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.norm2 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class RotaryEmbedding(nn.Module):
    """nanoVLM's ``RotaryEmbedding``: ``inv_freq`` is registered with ``register_buffer`` (persistent, the
    default), so ``save_model`` writes it to the file as ``decoder.rotary_embd.inv_freq``."""

    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, T: int) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(T).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[None]
        return torch.cos(emb), torch.sin(emb)


class LanguageModel(nn.Module):
    def __init__(self, cfg: NanoConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(LanguageModelBlock(cfg) for _ in range(cfg.lm_n_blocks))
        self.norm = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        if cfg.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        cos, sin = self.rotary_embd(x.shape[1])
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


class VisionLanguageModel(nn.Module):
    """nanoVLM: v0.1 puts ``[image embeddings ; token embeddings]`` through the decoder; the image-token
    versions (``image_token_id`` given) overwrite the embeddings of the ``<|image|>`` positions in order."""

    def __init__(self, cfg: NanoConfig, image_token_id: int | None = None) -> None:
        super().__init__()
        self.vision_encoder = ViT(cfg)
        self.decoder = LanguageModel(cfg)
        self.MP = ModalityProjector(cfg)
        self.image_token_id = image_token_id

    def embeddings(self, input_ids: Tensor, image: Tensor) -> Tensor:
        image_embd = self.MP(self.vision_encoder(image))
        token_embd = self.decoder.token_embedding(input_ids)
        if self.image_token_id is None:
            return torch.cat((image_embd, token_embd), dim=1)
        token_embd = token_embd.clone()
        token_embd[input_ids == self.image_token_id] = image_embd.reshape(-1, image_embd.shape[-1])
        return token_embd

    def forward(self, input_ids: Tensor, image: Tensor) -> Tensor:
        """Logits over all positions (image positions first for v0.1)."""
        return self.decoder.head(self.decoder(self.embeddings(input_ids, image)))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, image: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy, recomputing the whole sequence each step; returns the new token ids."""
        embeds = self.embeddings(input_ids, image)
        new = []
        for _ in range(max_new_tokens):
            logits = self.decoder.head(self.decoder(embeds)[:, -1])
            token = logits.argmax(-1, keepdim=True)
            new.append(token)
            embeds = torch.cat((embeds, self.decoder.token_embedding(token)), dim=1)
        return torch.cat(new, dim=1)


def config_json(cfg: NanoConfig, tokenizer: str, image_token: str | None = None) -> dict:
    """nanoVLM's flat ``config.json`` (the fields of its ``VLMConfig`` dataclass): v0.1's, or with
    ``image_token`` the mid-2025 one (``vlm_extra_tokens``, ``mp_image_token_length``, a chat template)."""
    if image_token is not None:
        side = cfg.vit_img_size // cfg.vit_patch_size // cfg.mp_pixel_shuffle_factor
        return {
            **config_json(cfg, tokenizer),
            "lm_base_vocab_size": cfg.lm_vocab_size - 1,
            "extra_token_amount": 1,
            "lm_chat_template": CHAT_TEMPLATE,
            "mp_image_token_length": side * side,
            "vlm_extra_tokens": {"image_token": image_token},
            "hf_repo_name": "nanoVLM",
        }
    return {
        "vit_hidden_dim": cfg.vit_hidden_dim,
        "vit_inter_dim": cfg.vit_inter_dim,
        "vit_patch_size": cfg.vit_patch_size,
        "vit_img_size": cfg.vit_img_size,
        "vit_n_heads": cfg.vit_n_heads,
        "vit_dropout": 0.0,
        "vit_n_blocks": cfg.vit_n_blocks,
        "vit_ln_eps": cfg.vit_ln_eps,
        "vit_cls_flag": False,
        "vit_model_type": "google/siglip-base-patch16-224",
        "lm_hidden_dim": cfg.lm_hidden_dim,
        "lm_inter_dim": cfg.lm_inter_dim,
        "lm_rms_eps": cfg.lm_rms_eps,
        "lm_re_base": cfg.lm_re_base,
        "lm_max_position_embeddings": cfg.lm_max_position_embeddings,
        "lm_vocab_size": cfg.lm_vocab_size,
        "lm_n_heads": cfg.lm_n_heads,
        "lm_n_kv_heads": cfg.lm_n_kv_heads,
        "lm_dropout": 0.0,
        "lm_n_blocks": cfg.lm_n_blocks,
        "lm_attn_scaling": 1.0,
        "lm_eos_token_id": 0,
        "lm_max_length": 79,
        "lm_use_tokens": False,
        "lm_tie_weights": cfg.lm_tie_weights,
        "lm_model_type": "HuggingFaceTB/SmolLM2-135M",
        "lm_tokenizer": tokenizer,
        "mp_pixel_shuffle_factor": cfg.mp_pixel_shuffle_factor,
        "vlm_load_backbone_weights": True,
        "vlm_checkpoint_path": "checkpoints/nanoVLM-222M",
    }
