"""SmolVLM / SmolVLM2 (transformers' Idefics3 and SmolVLM checkpoints) in tinyvlm's own parts.

The architecture (Marafioti et al., 2025, "SmolVLM: Redefining small and efficient multimodal models") is
a SigLIP vision tower (SigLIP-B/16 at 512 px for the 256M / 500M models), a connector that pixel-shuffles the
32 x 32 patch grid by ``scale_factor`` (4: 64 tokens of 16 * 768 channels per tile) and projects it with one
bias-free Linear, and a Llama (SmolLM2) decoder whose vocabulary carries the image tokens. So it loads as
tinyvlm's ``siglip`` encoder + ``pixel-shuffle-linear`` projector + ``llama`` decoder:

* the connector's channel order: Idefics3 reaches its ``[h/s, w/s, s*s*D]`` layout by views and transposes
  that, on the square grids it accepts, give exactly nanoVLM's order (token ``(i, j)`` holds patches
  ``(i*s + a, j*s + b)``, ``a`` outer, ``b`` inner); tinyvlm's projector order is that one (checked against
  transformers' connector in the tests);
* the vision embeddings: Idefics3 picks position ids by bucketing fractional patch coordinates, which is the
  identity for the full-size square tiles its image processor always produces (every view is resized or cut
  to exactly ``max_image_size``), so the plain SigLIP table lookup is exact;
* the image splitting, token layout and chat format are `tinyvlm.processing.splitting`, used by the
  processor's ``smolvlm`` layout.

SmolVLM2 (``model_type: smolvlm``) has the same image path; its video path is not implemented (videos are
frame sequences with timestamps in the prompt).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from tinyvlm.config import require
from tinyvlm.decoders.llama import LlamaConfig
from tinyvlm.encoders.siglip import SiglipConfig
from tinyvlm.errors import ConfigError
from tinyvlm.layers import RopeConfig
from tinyvlm.processing.splitting import CHAT_TEMPLATE, GLOBAL_TOKEN, IMAGE_TOKEN
from tinyvlm.processing.tokens import ImageTokenConfig
from tinyvlm.projectors.pixel_shuffle import PixelShuffleConfig
from tinyvlm.registry import Family, register_family, register_model
from tinyvlm.sources import Source
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vlm.config import BuiltParts, PartRecord, VLMConfig
from tinyvlm.vlm.model import VLM, assemble
from tinyvlm.weights import KeyMap

#: ``model_type`` values of their config.json files.
MODEL_TYPES = ("idefics3", "smolvlm")


def vision_config(hf: dict[str, Any]) -> SiglipConfig:
    """The SigLIP tower of a SmolVLM ``config.json`` (``vision_config``)."""
    vision = hf.get("vision_config") or {}
    require(vision, "num_channels", 3, family="smolvlm")
    for key in ("image_size", "patch_size"):
        if not isinstance(vision.get(key, 0), int):
            raise ConfigError(f"SmolVLM vision {key}={vision[key]!r}: tinyvlm supports square images and patches only")
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "hidden_act", "layer_norm_eps")  # fmt: skip
    defaults = {"hidden_size": 1152, "num_hidden_layers": 12, "num_attention_heads": 16, "patch_size": 32,
                "image_size": 224, "intermediate_size": 3072}  # fmt: skip  # Idefics3VisionConfig's defaults
    values = {key: vision.get(key, defaults.get(key)) for key in fields if key in vision or key in defaults}
    return SiglipConfig.validate_dict(values, context="SmolVLM vision_config")


def text_config(hf: dict[str, Any]) -> LlamaConfig:
    """The Llama decoder of a SmolVLM ``config.json`` (``text_config``); the head is tied or not as the
    outer ``tie_word_embeddings`` says (transformers ties ``lm_head`` to the text embedding by it)."""
    text = dict(hf.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise ConfigError(f"SmolVLM text_config has model_type {text['model_type']!r}; tinyvlm reads llama only")
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return LlamaConfig.from_hf(text)


def key_map(config: VLMConfig) -> KeyMap:
    """Their files (``save_pretrained`` of ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``
    and the Hub repos alike): ``model.vision_model.*``, ``model.connector.modality_projection.proj.weight``,
    ``model.text_model.*`` and ``lm_head.weight`` (absent, or a copy, when tied)."""
    tied = bool(config.parts and config.parts.decoder.config.get("tie_word_embeddings"))
    rename = (
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)", r"encoder.layers.\1.self_attn.o_proj.\2"),
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)", r"encoder.layers.\1.\2"),
        (r"model\.vision_model\.((?:embeddings|post_layernorm)\..+)", r"encoder.\1"),
        (r"model\.connector\.modality_projection\.proj\.weight", "projector.proj.weight"),
        (r"model\.text_model\.(.+)", r"decoder.\1"),
    )
    if tied:
        return KeyMap(rename=rename, copies=((r"lm_head\.weight", "decoder.embed_tokens.weight"),))
    return KeyMap(rename=(*rename, (r"lm_head\.weight", "decoder.lm_head.weight")))


# ---------------------------------------------------------------------------------------------- loading


def vlm_config(
    hf: dict[str, Any], name: str, *, processor: dict[str, Any], pre: dict[str, Any], stops: int | list[int] | None,
    tokenizer: Tokenizer | None,
) -> VLMConfig:
    """The `VLMConfig` of a SmolVLM checkpoint, checked against each other: ``config.json`` (``hf``), the
    processor settings (``processor_config.json``: ``image_seq_len``; ``pre``, the image processor's: image
    splitting), the stop ids (``generation_config.json``'s ``eos_token_id``) and the tokenizer (the image
    tokens' ids). Processor settings not given are those that fit the tower (SmolVLM's: tiles of its image size,
    images resized to four tiles and split); without a tokenizer the marker ids are unknown (none listed)."""
    vision, text = vision_config(hf), text_config(hf)
    tile = (pre.get("max_image_size") or {}).get("longest_edge", vision.image_size)
    problems = []
    if tile != vision.image_size:
        problems.append(f"tiles of {tile} px but a vision tower at {vision.image_size} px")
    if pre.get("resample", 1) != 1:
        problems.append(f"resample={pre['resample']} (tinyvlm implements SmolVLM's LANCZOS, 1)")
    for key in ("image_mean", "image_std"):
        if pre.get(key, [0.5] * 3) != [0.5] * 3:
            problems.append(f"{key}={pre[key]} (tinyvlm implements 0.5)")
    if not pre.get("do_pad", True) or not pre.get("do_normalize", True) or not pre.get("do_rescale", True):
        problems.append("do_pad / do_normalize / do_rescale switched off")
    scale = hf.get("scale_factor", 2)
    grid = vision.image_size // vision.patch_size
    if grid % scale:
        problems.append(f"scale_factor {scale} does not divide the {grid}x{grid} patch grid")
    seq_len = processor.get("image_seq_len", (grid // scale) ** 2)
    if seq_len != (grid // scale) ** 2:
        problems.append(f"image_seq_len {seq_len} but the connector gives {(grid // scale) ** 2} features per tile")
    if "image_token_id" not in hf:
        problems.append("config.json has no image_token_id")
    elif tokenizer is not None and tokenizer.token_to_id(IMAGE_TOKEN) != hf["image_token_id"]:
        problems.append(f"image_token_id {hf['image_token_id']} is not the tokenizer's {IMAGE_TOKEN!r}")
    if problems:
        raise ConfigError(f"{name}: unsupported SmolVLM settings: {'; '.join(problems)}")
    if stops is not None:  # transformers' generate stops on generation_config.json's ids (<end_of_utterance>)
        text = text.replace(eos_token_ids=[stops] if isinstance(stops, int) else list(stops))
    resize = pre.get("size", {}).get("longest_edge", 4 * tile) if pre.get("do_resize", True) else None
    tokens = ImageTokenConfig(
        token_layout="smolvlm",
        image_token=IMAGE_TOKEN,
        global_image_token=GLOBAL_TOKEN,
        tile_token="<row_{row}_col_{col}>",
        split_images=pre.get("do_image_splitting", True),
        max_grid=min(8, max(1, math.ceil((resize or tile) / tile))),
        resize_longest_edge=resize,
    )
    projector = PixelShuffleConfig(head="linear", bias=False, factor=scale, in_dim=vision.hidden_size, out_dim=text.hidden_size)
    marker_ids = [] if tokenizer is None else [tokenizer.token_to_id(token) for token in tokens.marker_tokens()]
    if None in marker_ids:
        raise ConfigError(f"{name}: the tokenizer lacks SmolVLM's image tokens {tokens.marker_tokens()}")
    parts = BuiltParts(
        encoder=PartRecord(family_name="siglip", config=vision.model_dump(mode="json")),
        decoder=PartRecord(family_name="llama", config=text.model_dump(mode="json")),
        projector=PartRecord(family_name="pixel-shuffle", config=projector.model_dump(mode="json")),
        image_token_id=hf["image_token_id"],
        marker_token_ids=marker_ids,
    )
    return VLMConfig(
        encoder=name,
        decoder=name,
        projector="pixel-shuffle-linear",
        projector_kwargs={"factor": scale},
        image_tokens=tokens,
        parts=parts,
    )


def read(source: Source) -> tuple[VLMConfig, Tokenizer]:
    """A SmolVLM checkpoint in its Hub layout: config, processor settings and tokenizer. The chat template is
    the folder's own when it takes string contents (tinyvlm's exports write such a template); SmolVLM's
    list-content template (the Hub repos' ``chat_template.json``) is replaced by `CHAT_TEMPLATE`, the same
    format for string contents; a folder without a template stays without one (plain prompts)."""
    tokenizer = Tokenizer.from_folder(source.tokenizer_folder())
    template = tokenizer.chat_template or source.json("chat_template.json").get("chat_template")
    if template is not None and not takes_string_contents(tokenizer, template):
        template = CHAT_TEMPLATE
    tokenizer.chat_template = template
    processor = source.json("processor_config.json")
    # The Hub repos ship preprocessor_config.json; transformers 5's processor.save_pretrained nests the image
    # processor's settings in processor_config.json instead (and writes no preprocessor_config.json).
    pre = source.json("preprocessor_config.json") or processor.get("image_processor") or {}
    stops = source.json("generation_config.json").get("eos_token_id")
    config = vlm_config(source.config_json(), source.name, processor=processor, pre=pre, stops=stops, tokenizer=tokenizer)
    return config, tokenizer


def read_config(hf: dict[str, Any], name: str) -> VLMConfig:
    """The architecture in ``config.json`` alone (processing at Idefics3's defaults, no tokenizer)."""
    return vlm_config(hf, name, processor={}, pre={}, stops=None, tokenizer=None)


def takes_string_contents(tokenizer: Tokenizer, template: str) -> bool:
    """Whether ``template`` renders a message whose content is a string (with an ``<image>`` placeholder)."""
    probe = IMAGE_TOKEN + "Is this a string?"
    rendering = copy.copy(tokenizer)
    rendering.chat_template = template
    try:
        return probe in rendering.apply_chat_template([{"role": "user", "content": probe}])
    except Exception:  # a template written for list contents may also fail on a string, in many ways
        return False


register_family(
    Family(
        name="smolvlm",
        kind="vlm",
        config_cls=VLMConfig,
        build=assemble,
        key_map=key_map,
        hf_model_types=MODEL_TYPES,
        read=read,
        read_config=read_config,
    )
)

# ------------------------------------------------------------------------------------------------- zoo
# The configs below are what `tinyvlm list-models` shows (parameters, widths); loading reads the repo's own
# config.json, preprocessor_config.json and tokenizer files.


def _zoo_config(repo: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> VLMConfig:
    """SigLIP-B/16-512 tower, shuffle 4 (64 tokens per 512-px tile), a SmolLM2 decoder with SmolVLM's
    49280-token vocabulary (``<image>`` 49190, ``<fake_token_around_image>`` 49189, ``<global-img>`` 49152,
    ``<row_r_col_c>`` 49152 + 6 (r - 1) + c), untied head, stop on ``<end_of_utterance>`` (49279)."""
    vision = SiglipConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=512, patch_size=16)  # fmt: skip
    text = LlamaConfig(
        vocab_size=49280, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=False, max_position_embeddings=8192, rope=RopeConfig(theta=100000.0),
        bos_token_id=1, eos_token_ids=[49279], pad_token_id=2,
    )  # fmt: skip
    tokens = ImageTokenConfig(
        token_layout="smolvlm", image_token=IMAGE_TOKEN, global_image_token=GLOBAL_TOKEN, tile_token="<row_{row}_col_{col}>",
        split_images=True, max_grid=4, resize_longest_edge=2048,
    )  # fmt: skip
    projector = PixelShuffleConfig(head="linear", bias=False, factor=4, in_dim=768, out_dim=hidden)
    tiles = [49152 + 6 * (r - 1) + c for r in range(1, 5) for c in range(1, 5)]
    parts = BuiltParts(
        encoder=PartRecord(family_name="siglip", config=vision.model_dump(mode="json")),
        decoder=PartRecord(family_name="llama", config=text.model_dump(mode="json")),
        projector=PartRecord(family_name="pixel-shuffle", config=projector.model_dump(mode="json")),
        image_token_id=49190,
        marker_token_ids=[49189, 49152, *tiles],
    )
    name = f"hf-hub:{repo}"
    return VLMConfig(encoder=name, decoder=name, projector="pixel-shuffle-linear", projector_kwargs={"factor": 4},
                     image_tokens=tokens, parts=parts)  # fmt: skip


_SMOLLM2_135M = (576, 30, 9, 3, 1536)
_SMOLLM2_360M = (960, 32, 15, 5, 2560)
for _key, _repo, _text, _what in (
    ("smolvlm-256m-instruct", "HuggingFaceTB/SmolVLM-256M-Instruct", _SMOLLM2_135M, "SmolVLM-256M-Instruct (Idefics3)"),
    ("smolvlm-500m-instruct", "HuggingFaceTB/SmolVLM-500M-Instruct", _SMOLLM2_360M, "SmolVLM-500M-Instruct (Idefics3)"),
    ("smolvlm2-256m-video-instruct", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", _SMOLLM2_135M,
     "SmolVLM2-256M-Video-Instruct, image path (videos not supported)"),
):
    register_model(
        _key,
        family="smolvlm",
        config=_zoo_config(_repo, *_text),
        hub_repo=_repo,
        license="apache-2.0",
        description=f"{_what}: SigLIP-B/16-512 + SmolLM2, 512-px tiles of 64 tokens + a global view; trained",
        trained=True,
    )
