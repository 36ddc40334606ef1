"""The text side of generation (`tinyvlm.generation`): the incremental detokenizer against full decodes on
byte-level and SentencePiece-style tokenizers, stop strings, and the validated `SamplingConfig`."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as Backend

from tinyvlm.errors import ConfigError
from tinyvlm.generation import IncrementalDetokenizer, SamplingConfig, StopStrings, TextStream
from tinyvlm.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "What colour is the square? The square is red.",
    "naïve café: é€ and 日本語のテキスト, ünïcödé",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 in one line",
    "  leading spaces, tabs\tand\nnew lines  ",
]


def byte_level() -> Tokenizer:
    """test-llama's 512-token byte-level BPE (SmolLM2's kind) with an added special token."""
    tokenizer = load_tokenizer("test-llama")
    tokenizer.add_special_tokens(["<|image|>"])
    return tokenizer


def sentencepiece_style(strip: bool) -> Tokenizer:
    """A byte-fallback BPE decoded as Llama-2 (``strip``: its leading-space Strip) or Gemma (no Strip) decode:
    ``▁`` -> space, ``<0xNN>`` tokens -> bytes, fused."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ("▁", "▁the", "▁square", "▁is", "▁red", "e", "s", "▁café", "é", "▁na", "ïve", "."):
        vocab.setdefault(piece, len(vocab))
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {
    "byte-level": byte_level,
    "sentencepiece-strip": lambda: sentencepiece_style(True),
    "sentencepiece": lambda: sentencepiece_style(False),
}


def stream_text(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(token) for token in ids] + [detokenizer.finish()]


def sentencepiece_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Known pieces where they fit, the UTF-8 bytes of every other character (byte fallback)."""
    ids = []
    for k, word in enumerate(text.split(" ")):
        word = ("▁" if k else "") + word
        if tokenizer.token_to_id(word) is not None:
            ids.append(tokenizer.token_to_id(word))
            continue
        for char in word:
            token = tokenizer.token_to_id(char)
            ids += [token] if token is not None else [tokenizer.token_to_id(f"<0x{b:02X}>") for b in char.encode()]
    return ids


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_pieces_join_to_the_full_decode(kind: str) -> None:
    """Multi-byte characters split over tokens (é, €, CJK, emoji with modifiers and joiners), special tokens
    between them, and random id sequences (invalid byte runs included): joined pieces == one full decode."""
    tokenizer = TOKENIZERS[kind]()
    encode = tokenizer.encode if kind == "byte-level" else lambda t: sentencepiece_ids(tokenizer, t)
    specials = [tokenizer.token_to_id(t) for t in ("<|image|>", "<|im_end|>", "<s>", "</s>") if tokenizer.token_to_id(t)]
    rng = random.Random(0)
    sequences = [encode(text) for text in TEXTS]
    sequences += [sum(([rng.choice(specials)] + encode(text) for text in TEXTS), [])]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))] for _ in range(300)]
    split = 0
    for ids in sequences:
        pieces = stream_text(tokenizer, ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in piece for piece in pieces)  # a split character is never shown broken
        split += sum(len(tokenizer.decode([t])) == 0 or "\ufffd" in tokenizer.decode([t]) for t in ids)
    assert split > 20  # the texts did split characters over tokens


def test_pieces_come_as_soon_as_a_character_is_complete() -> None:
    tokenizer = byte_level()
    ids = tokenizer.encode("é€ and 😀 done", add_special_tokens=False)
    pieces = stream_text(tokenizer, ids)
    shown = ""
    for k, piece in enumerate(pieces[:-1]):
        shown += piece
        prefix = tokenizer.decode(ids[: k + 1])
        assert shown == prefix.rstrip("\ufffd")  # all of the text so far, less an unfinished character
    assert pieces[-1] == ""


def test_each_step_decodes_a_short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """O(n) streaming: however long the answer, a step decodes a few recent tokens, not the whole answer."""
    tokenizer = byte_level()
    ids = tokenizer.encode(" ".join(TEXTS * 12), add_special_tokens=False)
    lengths: list[int] = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    assert "".join(stream_text(tokenizer, ids)) == decode(ids, skip_special_tokens=True)
    assert len(ids) > 400 and max(lengths) <= 8


def test_stop_strings_cut_before_the_first_occurrence() -> None:
    stops = StopStrings(["STOP", "\n\n"])
    assert [stops.push(p) for p in ("Hello S", "T", "ill there", " ST", "OP now")] == ["Hello ", "", "STill there", " ", ""]
    assert stops.found and stops.push("more") == "" and stops.finish() == ""
    earliest = StopStrings(["bb", "a\n\n"])
    assert earliest.push("xa\n\nbb") == "x" and earliest.found
    at_once = StopStrings(["<"])
    assert at_once.push("<tag>") == "" and at_once.found
    unfinished = StopStrings(["STOP"])
    assert unfinished.push("end ST") == "end " and not unfinished.found
    assert unfinished.finish() == "ST"  # the answer ended: the held text was answer text
    assert StopStrings([]).push("anything") == "anything"


def test_text_stream_cuts_at_stop_strings_spanning_tokens() -> None:
    tokenizer = byte_level()
    text = "The square is red. The circle is blue."
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop in (["circle"], [". The"], ["is red", "square"], ["not there"], ["blue.", "x"]):
        stream = TextStream(tokenizer, stop)
        pieces = []
        for token in ids:
            pieces.append(stream.push(token))
            if stream.done:
                break
        pieces.append(stream.finish())
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        assert "".join(pieces) == text[:cut]
        assert stream.done


def test_sampling_config_validates_every_field() -> None:
    assert SamplingConfig(stop="###").stop == ["###"] and SamplingConfig().stop == []
    assert SamplingConfig(eos_token_id=[3, 4]).eos_token_id == [3, 4]
    bad = {
        "max_new_tokens": -1,
        "temperature": -0.5,
        "top_k": 0,
        "top_p": 0.0,
        "repetition_penalty": 0.0,
        "seed": -3,
        "eos_token_id": -1,
        "stop": [""],
    }
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=rf"invalid SamplingConfig: {field}"):
            SamplingConfig(**{field: value})
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="eos_token_id"):
        SamplingConfig(eos_token_id=[2, -1])
    with pytest.raises(ConfigError, match="unknown field 'beams'"):
        SamplingConfig(beams=4)


def test_generation_does_not_import_the_decoders() -> None:
    """No import cycle: tinyvlm.decoders.base imports tinyvlm.generation, never the other way round."""
    import subprocess
    import sys

    code = "import sys, tinyvlm.generation; assert not any(m.startswith('tinyvlm.decoders') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
