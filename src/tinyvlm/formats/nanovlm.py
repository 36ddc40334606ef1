"""nanoVLM checkpoints (github.com/huggingface/nanoVLM) in tinyvlm's own parts.

A nanoVLM folder holds a flat ``config.json`` (its ``VLMConfig`` dataclass: ``vit_*``, ``lm_*``, ``mp_*``;
no ``model_type``) and ``model.safetensors`` with three modules: ``vision_encoder`` (a SigLIP ViT with a fused
``qkv_proj`` and a ``[1, N, D]`` position parameter), ``MP`` (pixel shuffle + one bias-free Linear) and
``decoder`` (Llama; a tied head is stored once, as ``decoder.head.weight``, because safetensors keeps the
first name of a shared tensor in sorted order). It loads as tinyvlm's ``siglip`` encoder +
``pixel-shuffle-linear`` projector (nanoVLM's channel order) + ``llama`` decoder.

Two prompt layouts are read, told apart by ``config.json``:

* **v0.1** (``lusxvr/nanoVLM-222M``; no ``vlm_extra_tokens``): the image's ``mp_image_token_length``
  features go *before* the prompt's tokens; the vocabulary has no image token. tinyvlm adds a
  ``<|image|>`` placeholder to the tokenizer (beyond the embedding matrix: its row is never looked up).
  v0.1 was trained on plain text, ``Question: {question} Answer:{answer}<eos>`` with the image before it
  (its ``VQADataset``; its ``generate.py`` prompts the same way): `V01_CHAT_TEMPLATE` writes turns so, so a
  string prompt (the question) and fine-tuning conversations get exactly nanoVLM's tokens. ``raw=True``
  takes the text as given.
* **image token** (``vlm_extra_tokens = {"image_token": "<|image|>"}``, mid-2025): ``mp_image_token_length``
  ``<|image|>`` tokens (a row of the extended vocabulary) where the image goes, ``lm_chat_template``.

Both preprocess images as nanoVLM does: bilinear resize to ``vit_img_size`` and ``ToTensor`` (values in
[0, 1], no mean / std). Checkpoints with image splitting (``<|global_image|>`` / ``<row_i_col_j>`` tokens,
nanoVLM >= 2025-09) use a different split rule and are refused with a `ConfigError`.

The tokenizer is not in a nanoVLM folder: it is ``lm_tokenizer`` (a Hub repo, or a local folder), fetched
separately. nanoVLM's RoPE rescales positions beyond ``lm_max_position_embeddings`` (8192) on the fly;
tinyvlm's decoder is exact up to that length.
"""

from __future__ import annotations

from typing import Any

from tinyvlm.config import require
from tinyvlm.decoders.llama import LlamaConfig
from tinyvlm.encoders.siglip import SiglipConfig
from tinyvlm.errors import ConfigError
from tinyvlm.layers import RopeConfig
from tinyvlm.processing.processor import IMAGE_PLACEHOLDER
from tinyvlm.projectors.pixel_shuffle import PixelShuffleConfig
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.sources import Source, tokenizer_source
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.processing.tokens import ImageTokenConfig
from tinyvlm.vlm.config import BuiltParts, PartRecord, VLMConfig
from tinyvlm.vlm.model import VLM, assemble
from tinyvlm.weights import KeyMap

#: The placeholder tinyvlm uses for v0.1 checkpoints, whose vocabulary has no image token.
V01_IMAGE_TOKEN = "<|image|>"
#: nanoVLM v0.1's text format as a chat template: a user turn is ``Question: {text} Answer:`` with its images
#: before it (v0.1 puts the image features before the text), an assistant turn its text and the
#: end-of-sequence token, straight after ``Answer:`` (v0.1's collator joins ``f"{question}{answer}"``).
V01_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    f"{{{{ '{IMAGE_PLACEHOLDER}' * message['content'].count('{IMAGE_PLACEHOLDER}') }}}}"
    f"Question: {{{{ message['content'].replace('{IMAGE_PLACEHOLDER}', '') }}}} Answer:"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('nanoVLM v0.1 was trained on questions and answers only, not on ' + message['role'] + ' turns') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def is_nanovlm_config(hf: dict[str, Any]) -> bool:
    """nanoVLM's config.json has no ``model_type``; its flat ``vit_*`` / ``lm_*`` fields tell it apart."""
    return "model_type" not in hf and "vit_hidden_dim" in hf and "lm_hidden_dim" in hf


def vision_config(hf: dict[str, Any]) -> SiglipConfig:
    if hf.get("vit_cls_flag", False):
        raise ConfigError("nanoVLM checkpoint with vit_cls_flag=true (a CLS token): tinyvlm reads CLS-free ViTs only")
    return SiglipConfig(
        hidden_size=hf["vit_hidden_dim"],
        intermediate_size=hf["vit_inter_dim"],
        num_hidden_layers=hf["vit_n_blocks"],
        num_attention_heads=hf["vit_n_heads"],
        image_size=hf["vit_img_size"],
        patch_size=hf["vit_patch_size"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=hf.get("vit_ln_eps", 1e-6),
    )


def text_config(hf: dict[str, Any], tokenizer: Tokenizer | None) -> LlamaConfig:
    """The decoder; its special ids from ``config.json``, else the tokenizer's (None: ``config.json``'s only)."""
    require(hf, "lm_attn_scaling", 1.0, family="nanovlm")
    eos = hf.get("lm_eos_token_id", None if tokenizer is None else tokenizer.eos_token_id)
    return LlamaConfig(
        vocab_size=hf["lm_vocab_size"],
        hidden_size=hf["lm_hidden_dim"],
        intermediate_size=hf["lm_inter_dim"],
        num_layers=hf["lm_n_blocks"],
        num_heads=hf["lm_n_heads"],
        num_kv_heads=hf["lm_n_kv_heads"],
        rms_norm_eps=hf["lm_rms_eps"],
        hidden_act="silu",
        tie_word_embeddings=hf.get("lm_tie_weights", True),
        max_position_embeddings=hf.get("lm_max_position_embeddings", 8192),
        rope=RopeConfig(theta=float(hf["lm_re_base"])),
        eos_token_ids=[] if eos is None else [eos],
        pad_token_id=None if tokenizer is None else tokenizer.pad_token_id,
    )


def key_map(config: VLMConfig) -> KeyMap:
    """nanoVLM's names -> tinyvlm's. Its files are ``safetensors.torch.save_model(model)``: a tied head is stored
    once, under whichever name safetensors kept (``decoder.head.weight``, the first in sorted order), and the
    persistent RoPE buffer ``decoder.rotary_embd.inv_freq`` is in the file (recomputed here from
    ``lm_re_base``, so not read)."""
    tied = bool(config.parts and config.parts.decoder.config.get("tie_word_embeddings"))
    rename = [
        (r"vision_encoder\.patch_embedding\.conv\.(weight|bias)", r"encoder.embeddings.patch_embedding.\1"),
        (r"vision_encoder\.patch_embedding\.position_embedding", "encoder.embeddings.position_embedding.weight"),
        (r"vision_encoder\.blocks\.(\d+)\.ln1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
        (r"vision_encoder\.blocks\.(\d+)\.ln2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
        (r"vision_encoder\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.o_proj.\2"),
        (r"vision_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
        (r"vision_encoder\.layer_norm\.(weight|bias)", r"encoder.post_layernorm.\1"),
        (r"MP\.proj\.weight", "projector.proj.weight"),
        (r"decoder\.token_embedding\.weight", "decoder.embed_tokens.weight"),
        (r"decoder\.blocks\.(\d+)\.norm1\.weight", r"decoder.layers.\1.input_layernorm.weight"),
        (r"decoder\.blocks\.(\d+)\.norm2\.weight", r"decoder.layers.\1.post_attention_layernorm.weight"),
        (r"decoder\.blocks\.(\d+)\.attn\.(q|k|v)_proj\.weight", r"decoder.layers.\1.self_attn.\2_proj.weight"),
        (r"decoder\.blocks\.(\d+)\.attn\.out_proj\.weight", r"decoder.layers.\1.self_attn.o_proj.weight"),
        (r"decoder\.blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"decoder.layers.\1.mlp.\2_proj.weight"),
        (r"decoder\.norm\.weight", "decoder.norm.weight"),
    ]
    head = (r"decoder\.head\.weight", "decoder.embed_tokens.weight" if tied else "decoder.lm_head.weight")
    qkv = tuple(rf"encoder.layers.\1.self_attn.{p}_proj.\2" for p in "qkv")
    return KeyMap(
        rename=tuple(rename) + (() if tied else (head,)),
        copies=(head,) if tied else (),
        unused=(r"decoder\.rotary_embd\.inv_freq",),
        split=((r"vision_encoder\.blocks\.(\d+)\.attn\.qkv_proj\.(weight|bias)", qkv),),
        squeeze=(r"vision_encoder\.patch_embedding\.position_embedding",),
    )


def read_tokenizer(hf: dict[str, Any]) -> Tokenizer:
    """``lm_tokenizer``: a Hub repo id (every published checkpoint names one, e.g.
    ``HuggingFaceTB/cosmo2-tokenizer``, a repo of tokenizer files only) or a local folder."""
    name = hf.get("lm_tokenizer")
    if not isinstance(name, str) or not name:
        raise ConfigError("nanoVLM config.json names no lm_tokenizer")
    return Tokenizer.from_folder(tokenizer_source(name).tokenizer_folder())


def vlm_config(hf: dict[str, Any], name: str, tokenizer: Tokenizer | None) -> VLMConfig:
    """The `VLMConfig` of a nanoVLM ``config.json``; adds the image token (v0.1: the placeholder) to
    ``tokenizer`` and sets its chat template. Without a tokenizer (`read_config`), the ids only it knows (the
    image token's, a pad id) are unknown: -1 and None."""
    extra = hf.get("vlm_extra_tokens")
    if extra is not None and set(extra) != {"image_token"}:
        raise ConfigError(
            f"{name}: a nanoVLM checkpoint with image splitting (extra tokens {sorted(extra)}) is not supported "
            "yet: tinyvlm reads v0.1 (image before the text) and single-image <|image|> checkpoints"
        )
    vision = vision_config(hf)
    text = text_config(hf, tokenizer)
    factor = hf["mp_pixel_shuffle_factor"]
    grid = vision.image_size // vision.patch_size
    if grid % factor:
        raise ConfigError(f"{name}: mp_pixel_shuffle_factor {factor} does not divide the {grid}x{grid} patch grid")
    per_image = (grid // factor) ** 2
    if hf.get("mp_image_token_length", per_image) != per_image:
        raise ConfigError(f"{name}: mp_image_token_length {hf['mp_image_token_length']} but the projector gives {per_image}")
    image_token = V01_IMAGE_TOKEN if extra is None else extra["image_token"]
    image_token_id = -1
    if tokenizer is not None:
        (image_token_id,) = tokenizer.add_special_tokens([image_token])
        tokenizer.chat_template = V01_CHAT_TEMPLATE if extra is None else hf.get("lm_chat_template", tokenizer.chat_template)
        if extra is not None and image_token_id >= text.vocab_size:
            raise ConfigError(f"{name}: {image_token!r} has no embedding row (lm_vocab_size {text.vocab_size})")
    projector = PixelShuffleConfig(head="linear", bias=False, factor=factor, in_dim=vision.hidden_size, out_dim=text.hidden_size)
    parts = BuiltParts(
        encoder=PartRecord(family_name="siglip", config=vision.model_dump(mode="json")),
        decoder=PartRecord(family_name="llama", config=text.model_dump(mode="json")),
        projector=PartRecord(family_name="pixel-shuffle", config=projector.model_dump(mode="json")),
        image_token_id=image_token_id,
    )
    return VLMConfig(
        encoder=name,
        decoder=name,
        projector="pixel-shuffle-linear",
        projector_kwargs={"factor": factor},
        image_tokens=ImageTokenConfig(image_token=image_token, rescale_only=True).resolved("nanovlm"),
        parts=parts,
    )


def read(source: Source) -> tuple[VLMConfig, Tokenizer]:
    """A nanoVLM checkpoint: its flat ``config.json`` and the tokenizer it names."""
    hf = source.config_json()
    tokenizer = read_tokenizer(hf)
    return vlm_config(hf, source.name, tokenizer), tokenizer


def read_config(hf: dict[str, Any], name: str) -> VLMConfig:
    """The architecture in ``config.json`` alone, without fetching the tokenizer it names."""
    return vlm_config(hf, name, None)


register_family(
    Family(
        name="nanovlm",
        kind="vlm",
        config_cls=VLMConfig,
        build=assemble,
        key_map=key_map,
        detect=is_nanovlm_config,
        read=read,
        read_config=read_config,
        describes="nanoVLM's flat config.json (vit_* / lm_* fields)",
    )
)

# ------------------------------------------------------------------------------------------------- zoo


def _zoo_config_222m() -> VLMConfig:
    """lusxvr/nanoVLM-222M (nanoVLM v0.1): SigLIP-B/16-224 + SmolLM2-135M (cosmo2 tokenizer, 49152 tokens,
    tied head), shuffle 2 + Linear: 49 image features before the text."""
    vision = SiglipConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224, patch_size=16)  # fmt: skip
    text = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, max_position_embeddings=8192,
        rope=RopeConfig(theta=100000.0), eos_token_ids=[0],
    )  # fmt: skip
    projector = PixelShuffleConfig(head="linear", bias=False, factor=2, in_dim=768, out_dim=576)
    parts = BuiltParts(
        encoder=PartRecord(family_name="siglip", config=vision.model_dump(mode="json")),
        decoder=PartRecord(family_name="llama", config=text.model_dump(mode="json")),
        projector=PartRecord(family_name="pixel-shuffle", config=projector.model_dump(mode="json")),
        image_token_id=49152,  # the placeholder tinyvlm appends to the 49152-token vocabulary
    )
    name = "hf-hub:lusxvr/nanoVLM-222M"
    return VLMConfig(encoder=name, decoder=name, projector="pixel-shuffle-linear", projector_kwargs={"factor": 2},
                     image_tokens=ImageTokenConfig(image_token=V01_IMAGE_TOKEN, rescale_only=True).resolved("nanovlm"),
                     parts=parts)  # fmt: skip


register_model(
    "lusxvr-nanovlm-222m",
    family="nanovlm",
    config=_zoo_config_222m(),
    hub_repo="lusxvr/nanoVLM-222M",
    license="mit",
    description="nanoVLM-222M as published (v0.1): SigLIP-B/16-224 + SmolLM2-135M, 49 image tokens; trained. "
    'A string prompt is the question, written as v0.1 was trained: "Question: ... Answer:"',
    trained=True,
)
