"""Tokenizer against transformers' AutoTokenizer on folders built the way the real checkpoints' are
(byte-level BPE tokenizer.json + tokenizer_config.json with the real chat templates): same ids, BOS rule,
decoding, special ids and chat renderings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import tinyvlm
from tinyvlm.errors import ConfigError
from tinyvlm.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What colour is the square? It is red.",
    "Vision-language models read images and text; they answer questions about pictures.",
    "Numbers 0123456789, punctuation !?.,;: and spaces   everywhere.",
] * 20

TEXTS = [
    "Hello world",
    "What colour is the square?",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "ünïcödé 日本語 🙂 text",
    "Isn't it 'quoted' ? yes , it is .",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn> <|eot_id|>",
]

MESSAGES = [
    [{"role": "user", "content": "What colour is the square?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  Hi  "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Describe the image."},
    ],
]

LLAMA32_TEMPLATE = """{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"""
"""meta-llama/Llama-3.2-1B-Instruct's chat template (tokenizer_config.json)."""


def llama3_style(folder: Path) -> Path:
    """As Llama-3's files: specials after the regular tokens, BOS added by tokenizer.json's post-processor
    (no add_bos_token in tokenizer_config.json), clean_up_tokenization_spaces on, stop ids in
    generation_config.json."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend.add_special_tokens(specials)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True,
        "chat_template": LLAMA32_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    stops = [backend.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": stops}))
    return folder


@pytest.fixture(scope="module", params=["smollm2", "gemma3", "llama3"])
def folder(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / request.param
    if request.param == "llama3":
        return llama3_style(path)
    tokenizer = train_tokenizer(CORPUS, 400, chat_format="chatml" if request.param == "smollm2" else "gemma")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(folder):
    return Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match(pair, text):
    ours, reference = pair
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_bos_rule(pair, folder):
    ours, _ = pair
    ids = ours.encode("Hello")
    if folder.name == "smollm2":
        assert ours.bos_token_id not in ids
    else:
        assert ids[0] == ours.bos_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches(pair, text):
    ours, reference = pair
    ids = reference.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_special_ids_match(pair):
    ours, reference = pair
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.pad_token_id == reference.pad_token_id
    assert len(ours) == len(reference)
    assert ours.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("messages", MESSAGES, ids=["user", "system-multi-turn"])
@pytest.mark.parametrize("prompt", [True, False])
def test_chat_template_renders_like_transformers(pair, messages, prompt):
    ours, reference = pair
    expected = reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_stop_ids(folder):
    tokenizer = Tokenizer.from_folder(folder)
    names = {"smollm2": ["<|im_end|>"], "gemma3": ["<eos>", "<end_of_turn>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"]}
    assert sorted(tokenizer.eos_token_ids) == sorted(tokenizer.token_to_id(t) for t in names[folder.name])


def test_added_special_tokens_match(folder):
    ours = Tokenizer.from_folder(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    new = ours.add_special_tokens(["<image>", "<row_1_col_1>"])
    reference.add_special_tokens({"additional_special_tokens": ["<image>", "<row_1_col_1>"]})
    assert new == reference.convert_tokens_to_ids(["<image>", "<row_1_col_1>"])
    assert len(ours) == len(reference)
    text = "look<image><image> at<row_1_col_1>this"
    assert ours.encode(text) == reference.encode(text)
    assert ours.add_special_tokens(["<image>"]) == new[:1]  # existing tokens keep their ids


def test_save_round_trip_and_transformers_reads_it(folder, tmp_path):
    ours = Tokenizer.from_folder(folder)
    ours.add_special_tokens(["<image>"])
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [*TEXTS, "a<image>b"]:
        assert again.encode(text) == ours.encode(text) == reference.encode(text)
    assert again.eos_token_ids == ours.eos_token_ids
    assert again.apply_chat_template(MESSAGES[0]) == ours.apply_chat_template(MESSAGES[0])


@pytest.mark.parametrize("key", ["test-llama", "test-gemma3"])
def test_shipped_test_tokenizers(key):
    tokenizer = tinyvlm.load_tokenizer(key)
    decoder_config = tinyvlm.get_spec(key).config
    assert len(tokenizer) == decoder_config.vocab_size
    assert tokenizer.bos_token_id == decoder_config.bos_token_id
    assert tokenizer.pad_token_id == decoder_config.pad_token_id
    assert sorted(tokenizer.eos_token_ids) == sorted(decoder_config.eos_token_ids)
    reference = transformers.AutoTokenizer.from_pretrained(str(Path(tinyvlm.tokenizer.__file__).parent / "assets" / key))
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.apply_chat_template(MESSAGES[1]) == reference.apply_chat_template(
        MESSAGES[1], add_generation_prompt=True, tokenize=False
    )


def test_load_tokenizer_local_dir(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    loaded = tinyvlm.load_tokenizer(f"local-dir:{tmp_path / 'model'}")
    assert loaded.encode(TEXTS[0]) == Tokenizer.from_folder(folder).encode(TEXTS[0])


def test_errors(tmp_path):
    with pytest.raises(tinyvlm.HubError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    gemma = train_tokenizer(CORPUS, 300, chat_format="gemma")
    with pytest.raises(ConfigError, match="alternate"):
        gemma.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    gemma.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        gemma.apply_chat_template(MESSAGES[0])
