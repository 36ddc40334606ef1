"""Export to transformers' layouts: a VLM as an Idefics3 (SmolVLM) folder, a decoder as a plain
``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` folder. transformers, vLLM and the other engines that serve
SmolVLM read the result; tinyvlm reads it back (`tinyvlm.load_vlm`, `tinyvlm.build_decoder`).

**What exports as Idefics3** (``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``): a SigLIP encoder,
a Llama-family decoder, the ``pixel-shuffle-linear`` projector (one bias-free Linear after the pixel shuffle,
whose channel order is Idefics3's on square grids) and the ``smolvlm`` image-token layout (tiles first, each
view wrapped in ``<fake_token_around_image>``, the global view last), which is the only one
``Idefics3Processor`` writes. Every VLM read from a SmolVLM / Idefics3 checkpoint qualifies, and so does every
SigLIP + Llama pair `tinyvlm.build_vlm` assembles with its defaults (pixel-shuffle-linear and SmolVLM's token
layout). Anything else is a `ConfigError` naming each reason: a DINOv3 encoder (CLS and register tokens,
RoPE, layer scale: not Idefics3's vision tower), a Gemma-3 decoder (Idefics3's text model is a Llama in vLLM), an MLP or biased
projector (Idefics3's connector is one bias-free Linear), nanoVLM's token layout (``<|image|>`` runs with the
global view first, which ``Idefics3Processor`` cannot produce), a LoRA adapter (merge it first).

The files (those of the SmolVLM Hub repos):

* ``config.json``: ``model_type`` idefics3, ``vision_config`` (``idefics3_vision``), ``text_config`` (llama,
  transformers v5 ``rope_parameters``), ``scale_factor``, ``image_token_id``, ``tie_word_embeddings``;
* ``model.safetensors`` with transformers' names: ``model.vision_model.*`` (``self_attn.out_proj``),
  ``model.connector.modality_projection.proj.weight``, ``model.text_model.*``, ``lm_head.weight`` (absent
  when tied);
* the tokenizer (``tokenizer.json``, ``tokenizer_config.json``), ``chat_template.jinja`` (the model's own
  template behind a preamble that turns transformers' ``[{"type": "image"}, {"type": "text", ...}]``
  contents into text with ``<image>`` placeholders; none for base decoders), ``processor_config.json``
  (``image_seq_len``), ``preprocessor_config.json`` (``Idefics3ImageProcessor``: tile size, resize edge,
  image splitting) and ``generation_config.json`` (stop ids).

One conversion keeps the model exact: Idefics3 looks up an embedding row for the image token, which a
tinyvlm decoder need not have (a VLM built from a decoder and an encoder fills the image positions with image
features before the embedding is used, so its image token has no row). The vocabulary is then padded with
zero rows up to the tokenizer's size; those ids are ``suppress_tokens`` in ``generation_config.json`` (so
transformers never generates them, as tinyvlm cannot) and their logits are 0.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from safetensors.torch import save_file

from tinyvlm.decoders.base import hf_token_value
from tinyvlm.errors import ConfigError
from tinyvlm.interop.lora import has_adapter, quantized_linear_types
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vlm.files import check_target, swap_into_place, unique_tensors
from tinyvlm.vlm.model import VLM

#: transformers' causal-LM class of each decoder family.
DECODER_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}
#: Turns list contents (``[{"type": "image"}, {"type": "text", "text": ...}]``, what transformers' processors
#: pass) into text with ``<image>`` placeholders, then hands the messages to the model's own template.
CONTENT_PREAMBLE = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set converted.messages = converted.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages %}"
)


def processor_chat_template(template: str) -> str:
    """``template`` (written for string contents) made to accept transformers' list contents too."""
    return template if template.startswith(CONTENT_PREAMBLE) else CONTENT_PREAMBLE + template


# ------------------------------------------------------------------------------------------------- VLMs


def idefics3_problems(vlm: VLM) -> list[str]:
    """Why ``vlm`` cannot be written as an Idefics3 model now (empty when it can)."""
    return weight_problems(vlm) + architecture_problems(vlm)


def architecture_problems(vlm: VLM) -> list[str]:
    """Why no model of ``vlm``'s architecture can be written as an Idefics3 model, however it is trained
    (`tinyvlm train` says so when it starts); empty when it can."""
    parts, tokens = vlm.config.parts, vlm.config.image_tokens
    assert parts is not None
    problems = []
    if parts.encoder.family_name != "siglip":
        problems.append(f"its {parts.encoder.family_name} encoder is not SigLIP, Idefics3's vision tower (DINOv3 has "
                        "CLS and register tokens, RoPE and layer scale)")
    if parts.decoder.family_name != "llama":
        problems.append(f"its {parts.decoder.family_name} decoder is not a Llama, Idefics3's text model (vLLM's "
                        "Idefics3 builds a Llama; export the decoder alone as a text model instead)")
    projector = parts.projector.config
    if projector.get("head") != "linear" or projector.get("bias") or projector.get("order", "nanovlm") != "nanovlm":
        problems.append(f"its projector (head {projector.get('head')!r}, bias {projector.get('bias')}) is not "
                        "pixel-shuffle-linear: Idefics3's connector is a pixel shuffle and one bias-free Linear")
    if tokens.token_layout != "smolvlm":
        fix = ("" if problems else ": build the VLM with processor_kwargs={'token_layout': 'smolvlm'} (tinyvlm train: "
               "--image-token-layout smolvlm) to export it")
        problems.append(f"its image tokens use the {tokens.token_layout} token layout ({tokens.image_token!r} runs, "
                        f"the global view first), which Idefics3Processor cannot write{fix}")
    grid = vlm.image_grid
    if grid[0] != grid[1]:
        problems.append(f"its encoder's {grid[0]}x{grid[1]} patch grid is not square (Idefics3 shuffles square grids)")
    return problems


def weight_problems(module: nn.Module) -> list[str]:
    """Weights that transformers' layouts cannot hold: an unmerged LoRA adapter, quantized linears."""
    problems = []
    if has_adapter(module):
        problems.append("it carries a LoRA adapter: merge it first (tinyvlm merge, or tinyvlm.interop.lora.merge_adapter)")
    quantized = sorted(kind.__name__ for kind in quantized_linear_types(module))
    if quantized:
        problems.append(f"its linears are quantized ({', '.join(quantized)}): export the full-precision model")
    return problems


def idefics3_key(key: str) -> str:
    """A tinyvlm VLM tensor name -> transformers' Idefics3 name (the inverse of `tinyvlm.formats.smolvlm`'s
    key map, which reads it back)."""
    rules = (
        (r"encoder\.layers\.(\d+)\.self_attn\.o_proj\.(.+)", r"model.vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
        (r"encoder\.layers\.(.+)", r"model.vision_model.encoder.layers.\1"),
        (r"encoder\.((?:embeddings|post_layernorm)\..+)", r"model.vision_model.\1"),
        (r"projector\.proj\.weight", "model.connector.modality_projection.proj.weight"),
        (r"decoder\.lm_head\.weight", "lm_head.weight"),
        (r"decoder\.(.+)", r"model.text_model.\1"),
    )
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise ConfigError(f"no Idefics3 name for the tensor {key!r}")


def padded_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` with zero rows appended up to ``rows``."""
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])))


def save_idefics3(vlm: VLM, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``vlm`` as a transformers Idefics3 folder (see the module docstring), atomically; ``overwrite``
    replaces a saved model in ``folder`` (`tinyvlm.vlm.files.check_target`)."""
    problems = idefics3_problems(vlm)
    if problems:
        raise ConfigError("cannot export this VLM to the transformers (Idefics3) layout: " + "; ".join(problems))
    if vlm.tokenizer is None:
        raise ConfigError("this VLM has no tokenizer to export; build it with build_vlm or load it with load_vlm")
    tokenizer = vlm.tokenizer
    decoder, encoder = vlm.decoder, vlm.encoder
    vocab = max(decoder.vocab_size, len(tokenizer))
    tied = decoder.lm_head is None
    tensors = {idefics3_key(key): value for key, value in unique_tensors(vlm).items()}
    for key in ("model.text_model.embed_tokens.weight", "lm_head.weight"):
        if key in tensors:
            tensors[key] = padded_rows(tensors[key], vocab)
    vision = encoder.config
    text = decoder.config.to_hf() | {"vocab_size": vocab}
    config = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": vlm.image_token_id,
        "scale_factor": vlm.projector.factor,
        "tie_word_embeddings": tied,
        "dtype": str(decoder.embed_tokens.weight.dtype).removeprefix("torch."),
        "use_cache": True,
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.hidden_act,
            "layer_norm_eps": vision.layer_norm_eps,
        },
        "text_config": text,
    }
    tokens = vlm.config.image_tokens
    tile = encoder.image_size
    preprocessor = {
        "image_processor_type": "Idefics3ImageProcessor",
        "processor_class": "Idefics3Processor",
        "do_convert_rgb": True,
        "do_resize": tokens.resize_longest_edge is not None,
        "size": {"longest_edge": tokens.resize_longest_edge or 4 * tile},
        "resample": 1,  # LANCZOS, as tinyvlm's SmolVLM splitter
        "do_image_splitting": tokens.split_images,
        "max_image_size": {"longest_edge": tile},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
    }
    processor = {"image_seq_len": vlm.processor.tokens_per_view, "processor_class": "Idefics3Processor"}
    generation = generation_config(decoder.config, suppress=list(range(decoder.vocab_size, vocab)))
    files = {"config.json": config, "preprocessor_config.json": preprocessor, "processor_config.json": processor,
             "generation_config.json": generation}
    template = tokenizer.chat_template and processor_chat_template(tokenizer.chat_template)
    return _write(Path(folder), tensors, files, tokenizer, template, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- decoders


def generation_config(config: Any, *, suppress: Sequence[int] = ()) -> dict[str, Any]:
    """``generation_config.json``: the decoder's special ids (stop ids as a list when several)."""
    generation: dict[str, Any] = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_token_value(config.eos_token_ids),
                                  "pad_token_id": config.pad_token_id}
    if suppress:
        generation["suppress_tokens"] = list(suppress)
    return generation


def save_hf_decoder(decoder: nn.Module, folder: str | Path, tokenizer: Tokenizer | None = None, *,
                    overwrite: bool = False) -> Path:
    """Write a decoder as a transformers ``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` folder (``config.json``,
    ``model.safetensors`` with ``model.``-prefixed names and ``lm_head.weight`` when untied,
    ``generation_config.json``, and the tokenizer with ``chat_template.jinja`` when given), atomically;
    ``overwrite`` replaces a saved model in ``folder``."""
    problems = weight_problems(decoder)
    if problems:
        raise ConfigError("cannot export this decoder to the transformers layout: " + "; ".join(problems))
    family = decoder.config.family
    if family not in DECODER_ARCHITECTURES:
        raise ConfigError(f"no transformers layout for the {family} decoder family (exported: {', '.join(DECODER_ARCHITECTURES)})")
    tensors = {(key if key == "lm_head.weight" else f"model.{key}"): value for key, value in unique_tensors(decoder).items()}
    config = {"architectures": [DECODER_ARCHITECTURES[family]], **decoder.config.to_hf(),
              "dtype": str(decoder.embed_tokens.weight.dtype).removeprefix("torch."), "use_cache": True}
    files = {"config.json": config, "generation_config.json": generation_config(decoder.config)}
    return _write(Path(folder), tensors, files, tokenizer, tokenizer.chat_template if tokenizer else None,
                  overwrite=overwrite)


# ------------------------------------------------------------------------------------------------ writing


def _write(folder: Path, tensors: dict[str, Tensor], files: dict[str, Any], tokenizer: Tokenizer | None,
           chat_template: str | None, *, overwrite: bool) -> Path:
    """The folder, written to a temporary folder next to it and renamed into place once complete."""
    check_target(folder, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.exporting-"))
    try:
        if tokenizer is not None:
            plain = copy.copy(tokenizer)
            plain.chat_template = None  # transformers 5 keeps it in chat_template.jinja
            plain.save_pretrained(staging)
            if chat_template:
                (staging / "chat_template.jinja").write_text(chat_template)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
