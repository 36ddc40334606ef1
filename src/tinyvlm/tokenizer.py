"""Tokenizers: a checkpoint's ``tokenizer.json`` through the `tokenizers` library, with the special tokens,
BOS/EOS rules and jinja chat template of its ``tokenizer_config.json`` — the same ids and renderings as
transformers' ``AutoTokenizer`` on the same folder, without transformers.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from tinyvlm.errors import ConfigError, HubError
from tinyvlm.sources import resolve

#: SmolLM2-Instruct's template (HuggingFaceTB/SmolLM2-135M-Instruct, tokenizer_config.json): ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma-3's template (google/gemma-3-*-it, tokenizer_config.json): ``<start_of_turn>{user|model}`` turns.
GEMMA_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A checkpoint's tokenizer. Build it with `Tokenizer.from_folder` or `load_tokenizer`."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        """``add_bos_token`` / ``add_eos_token``: None keeps ``tokenizer.json``'s post-processor, a bool
        replaces it (as transformers does when ``tokenizer_config.json`` sets them). ``stop_token_ids``:
        extra ids that end a generation besides ``eos_token`` (generation_config.json's ``eos_token_id``)."""
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.stop_token_ids = list(stop_token_ids or [])
        for token in (bos_token, eos_token, unk_token, pad_token):
            if token is not None and backend.token_to_id(token) is None:
                backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor()

    def _set_post_processor(self) -> None:
        bos = self.bos_token if self.add_bos_token else None
        eos = self.eos_token if self.add_eos_token else None
        single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
        pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
        special = [(t, self.backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``chat_template.jinja``, ``generation_config.json`` when present) from a checkpoint folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise HubError(
                f"{folder} has no tokenizer.json; tinyvlm reads fast (tokenizers-library) tokenizers only. "
                "Convert it once with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder)."
            )
        backend = Backend.from_file(str(path))
        config = _read_json(folder / "tokenizer_config.json")
        specials = _read_json(folder / "special_tokens_map.json")
        tokens = {name: _token_str(config.get(name, specials.get(name))) for name in _SPECIAL_NAMES}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        generation = _read_json(folder / "generation_config.json")
        stops = generation.get("eos_token_id")
        return cls(
            backend,
            **tokens,
            chat_template=template,
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            stop_token_ids=[stops] if isinstance(stops, int) else stops,
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (and ``generation_config.json``'s stop ids
        when there are extra ones) so that both tinyvlm and transformers' AutoTokenizer read the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None})
        if self.add_bos_token is not None:
            config["add_bos_token"] = self.add_bos_token
        if self.add_eos_token is not None:
            config["add_eos_token"] = self.add_eos_token
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.stop_token_ids:
            generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
            if self.pad_token_id is not None:
                generation["pad_token_id"] = self.pad_token_id
            _write_atomic(folder / "generation_config.json", json.dumps(generation, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------ ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models (it would eat real spaces before punctuation)
        if self.clean_up_tokenization_spaces and not isinstance(self.backend.model, models.BPE):
            return _clean_up(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens (a VLM's image tokens) that are never split; returns their ids (existing
        tokens keep theirs). Grow the decoder's vocabulary to ``len(tokenizer)`` afterwards."""
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: the eos token and the checkpoint's other stop ids."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        return list(dict.fromkeys(ids + self.stop_token_ids))

    # ------------------------------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the checkpoint's own jinja template."""
        if self.chat_template is None:
            raise ConfigError(
                "this tokenizer has no chat template (a base model?): pass plain text, or set "
                "tokenizer.chat_template to a jinja template"
            )
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{name: getattr(self, name) for name in _SPECIAL_NAMES},
        )


@lru_cache(maxsize=16)
def _compile(template: str):
    """A template in a sandboxed environment configured as transformers configures it."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"invalid chat template: {error}") from None


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for WordPiece-style vocabularies)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise HubError(f"cannot parse {path}: {error}") from None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a zoo key (the ``test-*`` decoders use one shipped with tinyvlm), an
    ``hf-hub:ORG/NAME`` repo or a ``local-dir:PATH`` folder."""
    return Tokenizer.from_folder(resolve(name).tokenizer_folder())


# --------------------------------------------------------------------------------------------- training

ChatFormat = Literal["chatml", "gemma"]

#: Special tokens (in id order from 0), eos / pad / bos, extra stop tokens and template of each chat format.
_FORMATS: dict[str, dict[str, Any]] = {
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": None,
        "stops": [],
        "chat_template": CHATML_TEMPLATE,
    },
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                     "<end_of_image>"],
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "stops": ["<end_of_turn>"],
        "chat_template": GEMMA_TEMPLATE,
    },
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, chat_format: ChatFormat = "chatml") -> Tokenizer:
    """A small byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on ``texts``, with the special
    tokens, BOS rule and chat template of ``chat_format``: ``"chatml"`` (SmolLM2-Instruct: ``<|im_start|>``
    turns, no BOS, stops on ``<|im_end|>``) or ``"gemma"`` (Gemma-3: ``<start_of_turn>`` turns, BOS added,
    stops on ``<eos>`` and ``<end_of_turn>``). Every byte has a token, so any text encodes."""
    if chat_format not in _FORMATS:
        raise ConfigError(f"chat_format must be one of {', '.join(_FORMATS)}; got {chat_format!r}")
    spec = _FORMATS[chat_format]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(spec["specials"]) + len(alphabet):
        raise ConfigError(f"vocab_size must be at least {len(spec['specials']) + len(alphabet)} (specials + 256 bytes)")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return Tokenizer(
        backend,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        unk_token=spec["unk_token"],
        pad_token=spec["pad_token"],
        chat_template=spec["chat_template"],
        add_bos_token=spec["add_bos_token"],
        stop_token_ids=[backend.token_to_id(t) for t in spec["stops"]],
    )
