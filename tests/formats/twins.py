"""Tiny random twins of the trained VLMs, written to folders in their official on-disk layouts.

* `write_idefics3_twin` / `write_smolvlm_twin`: transformers' ``Idefics3ForConditionalGeneration`` /
  ``SmolVLMForConditionalGeneration`` built from their config classes, weights perturbed so that every norm
  weight and bias matters, saved with ``save_pretrained`` next to the Hub repos' processor files
  (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.json``, ``processor_config.json``,
  ``preprocessor_config.json``), with a tiny byte-level BPE tokenizer carrying SmolVLM's special tokens.
* `write_nanovlm_twin`: a ``config.json`` + ``model.safetensors`` in nanoVLM's own layout (appendix of
  ``prior-art-nanovlm.md``), with a tokenizer folder named by ``lm_tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

#: SmolVLM-256M-Instruct's chat template (``chat_template.json`` of the Hub repo).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_CORPUS = [
    "What is in this image? A red square on a blue background.",
    "User: describe the picture. Assistant: a cat sitting on a mat, next to a green ball.",
    "How many shapes are there? There are three shapes: a circle, a square and a triangle.",
    "The quick brown fox jumps over the lazy dog. 0123456789 colours: red green blue yellow.",
] * 4


def tiny_bpe(special: list[str], vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on a few sentences, with ``special`` as special added tokens (ids after the BPE)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special[:3],  # <|endoftext|>, <|im_start|>, <|im_end|> get ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.add_special_tokens(special[3:])
    return tokenizer


def smolvlm_special_tokens() -> list[str]:
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    return [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>", *rows,
        "<fake_token_around_image>", "<image>", "<end_of_utterance>",
    ]  # fmt: skip


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Realistic spread: every parameter gets noise, norm weights move away from 1 and biases from 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and ("norm" in name or name.endswith(".weight")):
                param.copy_(1.0 + 0.2 * noise)  # LayerNorm / RMSNorm weights
            elif param.ndim == 1:
                param.copy_(0.1 * noise)  # biases
            else:
                param.add_(0.02 * noise)


def _write_tokenizer_files(folder: Path, tokenizer: Tokenizer, *, bos: str, eos: str, pad: str) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
        "model_max_length": 8192,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_smolvlm_processor_files(
    folder: Path, *, image_seq_len: int, longest_edge: int, tile: int, do_image_splitting: bool = True
) -> Tokenizer:
    """The tokenizer and processor files of a SmolVLM Hub repo, at tiny sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_bpe(smolvlm_special_tokens())
    _write_tokenizer_files(folder, tokenizer, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}))
    (folder / "processor_config.json").write_text(
        json.dumps({"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"})
    )
    preprocessor = {
        "do_convert_rgb": True,
        "do_image_splitting": do_image_splitting,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics3ImageProcessor",
        "max_image_size": {"longest_edge": tile},
        "processor_class": "Idefics3Processor",
        "resample": 1,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": longest_edge},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return tokenizer


def write_smolvlm_twin(
    folder: Path,
    *,
    model_type: str = "idefics3",
    scale_factor: int = 4,
    tie_word_embeddings: bool = False,
    do_image_splitting: bool = True,
    seed: int = 0,
) -> torch.nn.Module:
    """A tiny ``Idefics3ForConditionalGeneration`` (``model_type="idefics3"``, as SmolVLM-256M/500M-Instruct) or
    ``SmolVLMForConditionalGeneration`` (``"smolvlm"``, as SmolVLM2) in its Hub layout; returns the reference
    model in eval mode (fp32, eager attention)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    image_size, patch_size = 32, 4  # an 8 x 8 patch grid per tile
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    tokenizer = write_smolvlm_processor_files(
        folder,
        image_seq_len=image_seq_len,
        longest_edge=4 * image_size,
        tile=image_size,
        do_image_splitting=do_image_splitting,
    )
    vocab = tokenizer.get_vocab_size()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip
    text = dict(
        model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    config_cls, model_cls = {
        "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
        "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
    }[model_type]
    config = config_cls(
        vision_config=vision,
        text_config=text,
        scale_factor=scale_factor,
        image_token_id=tokenizer.token_to_id("<image>"),
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    perturb(model, seed)
    model.save_pretrained(folder)
    generation = {"bos_token_id": 1, "eos_token_id": tokenizer.token_to_id("<end_of_utterance>"), "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return model


def hf_processor(folder: Path):
    """transformers' ``Idefics3Processor`` with the PIL image processor (the torchvision one needs torchvision)
    over a twin folder's files."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

    pre = json.loads((folder / "preprocessor_config.json").read_text())
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=pre["do_image_splitting"],
        max_image_size=pre["max_image_size"],
        size=pre["size"],
        resample=pre["resample"],
        image_mean=pre["image_mean"],
        image_std=pre["image_std"],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    image_seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def write_nanovlm_twin(
    folder: Path, *, image_token: str | None = None, tied: bool = True, seed: int = 0, lm_tokenizer: str | None = None
):
    """A tiny nanoVLM checkpoint in nanoVLM's own layout: ``config.json`` + ``model.safetensors`` written with
    ``safetensors.torch.save_model`` as nanoVLM's ``save_pretrained`` does (persistent buffers included), and
    its tokenizer files in a sibling folder ``<folder>-tokenizer`` (nanoVLM folders carry no tokenizer), which
    ``lm_tokenizer`` names: that folder's path by default, or a Hub repo id that serves those files (every
    published checkpoint names a repo, e.g. ``HuggingFaceTB/cosmo2-tokenizer``). ``image_token=None``: v0.1
    (image before the text); ``"<|image|>"``: the image-token version (one more vocabulary row). Returns the
    reference model."""
    from nanovlm_reference import NanoConfig, VisionLanguageModel, config_json
    from safetensors.torch import save_model

    tokenizer_folder = folder.parent / f"{folder.name}-tokenizer"
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    _write_tokenizer_files(tokenizer_folder, tokenizer, bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    base = tokenizer.get_vocab_size()
    cfg = NanoConfig(lm_vocab_size=base + (image_token is not None), lm_tie_weights=tied)
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg, image_token_id=None if image_token is None else base).eval()
    perturb(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    named = lm_tokenizer or str(tokenizer_folder)
    (folder / "config.json").write_text(json.dumps(config_json(cfg, named, image_token), indent=4))
    save_model(model, str(folder / "model.safetensors"))
    return model


def resave_processor_with_transformers(folder: Path) -> None:
    """Replace a twin's processor files by what transformers 5's ``Idefics3Processor.save_pretrained`` writes:
    ``processor_config.json`` with the image processor's settings nested under ``image_processor`` (no
    ``preprocessor_config.json``), the template as ``chat_template.jinja`` (no ``chat_template.json``), and its
    tokenizer files."""
    import tempfile

    processor = hf_processor(folder)
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        for name in ("preprocessor_config.json", "chat_template.json", "processor_config.json"):
            (folder / name).unlink(missing_ok=True)
        for path in Path(tmp).iterdir():
            if path.name not in ("tokenizer.json", "tokenizer_config.json"):  # keep the special-token settings
                path.replace(folder / path.name)
    assert not (folder / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((folder / "processor_config.json").read_text())
