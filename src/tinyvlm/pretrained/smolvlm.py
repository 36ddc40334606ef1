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
* the image splitting, token layout and chat format are `tinyvlm.pretrained.smolvlm_processing`, used by the
  processor's ``smolvlm`` layout.

SmolVLM2 (``model_type: smolvlm``) has the same image path; its video path is not implemented (videos are
frame sequences with timestamps in the prompt).
"""

from __future__ import annotations

from typing import Any

from tinyvlm.config import require
from tinyvlm.decoders.llama import LlamaConfig
from tinyvlm.encoders.siglip import SiglipConfig
from tinyvlm.errors import ConfigError
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


def key_map(tied: bool) -> KeyMap:
    """Their files (``save_pretrained`` of ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``
    and the Hub repos alike): ``model.vision_model.*``, ``model.connector.modality_projection.proj.weight``,
    ``model.text_model.*`` and ``lm_head.weight`` (absent, or a copy, when tied)."""
    rename = (
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)", r"encoder.layers.\1.\2"),
        (r"model\.vision_model\.((?:embeddings|post_layernorm)\..+)", r"encoder.\1"),
        (r"model\.connector\.modality_projection\.proj\.weight", "projector.proj.weight"),
        (r"model\.text_model\.(.+)", r"decoder.\1"),
    )
    if tied:
        return KeyMap(rename=rename, unused=(r"lm_head\.weight",))
    return KeyMap(rename=(*rename, (r"lm_head\.weight", "decoder.lm_head.weight")))
