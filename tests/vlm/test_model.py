"""The mix-and-match VLM: every encoder family x decoder family (test-* entries), forward, loss, generation,
streaming, save / load / push, recipes and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tinyvlm
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.processing.processor import IGNORE_INDEX
from tinyvlm.api import build_vlm, load_vlm
from tinyvlm.vlm.config import VLMConfig
from tinyvlm.vlm.model import VLM

ENCODERS = ["test-siglip", "test-dinov3"]
DECODERS = ["test-llama", "test-gemma3"]
PAIRS = [(e, d) for e in ENCODERS for d in DECODERS]


def make_vlm(encoder: str = "test-siglip", decoder: str = "test-llama", **options) -> VLM:
    torch.manual_seed(0)
    options.setdefault("projector_kwargs", {"factor": 2})
    vlm = build_vlm(encoder, decoder, pretrained=False, **options)
    with torch.no_grad():  # random-init norms / biases start at 1 / 0: spread them
        for name, p in vlm.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return vlm


def picture(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "+".join(p))
def vlm(request: pytest.FixtureRequest) -> VLM:
    return make_vlm(*request.param)


def test_forward_scatters_projected_features_into_image_positions(vlm: VLM) -> None:
    batch = vlm.processor("Describe <image> please", [picture(1)])
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    embeds = vlm.embed_inputs(ids, pixels)
    is_image = ids == vlm.image_token_id
    grid = vlm.encoder.grid_size(64, 64)
    features = vlm.projector(vlm.encoder(pixels), grid)  # not scaled, not looked up
    torch.testing.assert_close(embeds[is_image], features.reshape(-1, vlm.dim))
    torch.testing.assert_close(embeds[~is_image], vlm.decoder.embed(ids[~is_image]))  # text: the family's embedding
    out = vlm(**batch)
    assert out.logits.shape == (1, ids.shape[1], vlm.decoder.vocab_size)
    reference = vlm.decoder(inputs_embeds=embeds).logits
    torch.testing.assert_close(out.logits, reference)


def test_loss_is_mean_cross_entropy_on_labelled_positions(vlm: VLM) -> None:
    messages = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "blue, mostly"}]
    ids, labels = vlm.processor.encode_example(messages, [picture(2)])
    input_ids, label_t = torch.tensor([ids]), torch.tensor([labels])
    pixels = vlm.processor.pixel_values([picture(2)])
    out = vlm(input_ids, pixel_values=pixels, labels=label_t)
    logits = out.logits[0]
    terms = [
        -F.log_softmax(logits[t].float(), -1)[labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX
    ]
    assert out.num_labels == len(terms) > 2
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    out.loss.backward()
    assert vlm.projector.state_dict()  # gradients reach the projector
    assert all(p.grad is not None for p in vlm.projector.parameters())
    vlm.zero_grad(set_to_none=True)


def _greedy_by_full_forward(vlm: VLM, prompt: str, images: list, steps: int) -> list[int]:
    batch = vlm.processor(prompt, images)
    ids = batch["input_ids"]
    stops = set(vlm.decoder.config.eos_token_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = vlm(ids, pixel_values=batch["pixel_values"]).logits
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            ids = torch.cat((ids, torch.tensor([[token]])), dim=1)
    return new


def test_greedy_generation_equals_a_full_forward_loop_and_streams(vlm: VLM) -> None:
    images = [picture(3)]
    expected = _greedy_by_full_forward(vlm, "What is it?", images, 12)
    assert len(expected) >= 3  # a real continuation, not an immediate stop
    answer = vlm.generate("What is it?", images, max_new_tokens=12)
    assert answer == vlm.tokenizer.decode(expected, skip_special_tokens=True)
    assert answer == vlm.generate("What is it?", images, max_new_tokens=12)  # deterministic
    pieces = list(vlm.stream("What is it?", images, max_new_tokens=12))
    assert "".join(pieces) == answer and all(pieces)


def test_batches_of_prompts_match_single_prompts() -> None:
    vlm = make_vlm("test-dinov3", "test-gemma3")
    prompts = ["Short?", [{"role": "user", "content": "A longer question about <image> and <image> here"}]]
    images = [[], [picture(4), picture(5, size=(40, 90))]]
    batched = vlm.generate(prompts, images, max_new_tokens=8)
    assert batched == [vlm.generate(p, i, max_new_tokens=8) for p, i in zip(prompts, images)]
    streamed = ["", ""]
    for pieces in vlm.stream(prompts, images, max_new_tokens=8):
        streamed = [s + p for s, p in zip(streamed, pieces)]
    assert streamed == batched


def spy_on_prompts(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The ``input_ids`` each VLM generation starts from, recorded as generation starts."""
    import tinyvlm.vlm.model as model

    prompts: list[torch.Tensor] = []
    start = model.generate_tokens

    def recorded(decoder, input_ids, sampling, **inputs):
        prompts.append(input_ids.clone())
        return start(decoder, input_ids, sampling, **inputs)

    monkeypatch.setattr(model, "generate_tokens", recorded)
    return prompts


def count_steps(vlm: VLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each decoder pass (the prompt's, then one per new token)."""
    calls: list[int] = []
    hidden_states = vlm.decoder.hidden_states
    monkeypatch.setattr(vlm.decoder, "hidden_states", lambda *a, **k: calls.append(1) or hidden_states(*a, **k))
    return calls


#: Seeded sampling: varied, reproducible answers (greedy answers of random-init twins loop on one token).
SAMPLED = dict(temperature=1.0, seed=0)


def a_stop_string(answer: str, start: int = 8) -> str:
    """Three characters of ``answer`` first found at or after ``start``, so that a cut there is mid-answer."""
    for k in range(start, len(answer) - 3):
        stop = answer[k : k + 3]
        if answer.find(stop) == k and stop.isprintable() and "\ufffd" not in stop:
            return stop
    raise AssertionError(f"no stop string in {answer!r}")


def test_stop_strings_end_the_answer_and_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    vlm = make_vlm()
    images = [picture(3)]
    free = vlm.generate("What is it?", images, max_new_tokens=30, **SAMPLED)
    stop = a_stop_string(free)
    expected = free[: free.find(stop)]
    assert len(expected) >= 8
    calls = count_steps(vlm, monkeypatch)
    assert vlm.generate("What is it?", images, max_new_tokens=30, stop=[stop, "\x00never"], **SAMPLED) == expected
    assert 0 < len(calls) < 30  # stopped as soon as the stop string appeared
    pieces = list(vlm.stream("What is it?", images, max_new_tokens=30, stop=stop, **SAMPLED))
    assert "".join(pieces) == expected and len(pieces) > 1
    starts_only = stop + "\x00"  # its start appears, it never completes: held back, then released
    assert vlm.generate("What is it?", images, max_new_tokens=30, stop=starts_only, **SAMPLED) == free


def test_stop_strings_are_tracked_per_row() -> None:
    vlm = make_vlm("test-dinov3", "test-gemma3")
    prompts = ["Short?", [{"role": "user", "content": "A longer question about <image> here"}]]
    images = [[], [picture(4)]]
    free = vlm.generate(prompts, images, max_new_tokens=20, **SAMPLED)
    stop = a_stop_string(free[0], start=4)
    assert stop not in free[1]
    cut = vlm.generate(prompts, images, max_new_tokens=20, stop=[stop], **SAMPLED)
    assert cut == [free[0][: free[0].find(stop)], free[1]]
    streamed = ["", ""]
    for pieces in vlm.stream(prompts, images, max_new_tokens=20, stop=[stop], **SAMPLED):
        streamed = [s + p for s, p in zip(streamed, pieces)]
    assert streamed == cut


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    vlm = make_vlm()
    options = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    torch.manual_seed(1)
    first = vlm.generate("What is it?", [picture(3)], seed=7, **options)
    state = torch.get_rng_state()
    second = vlm.generate("What is it?", [picture(3)], seed=7, **options)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second
    others = {vlm.generate("What is it?", [picture(3)], seed=seed, **options) for seed in range(8)}
    assert len(others) > 1


def test_repetition_penalty_reaches_the_decoder() -> None:
    """The VLM's answer is the decoder's penalised greedy continuation of the prompt (image placeholders,
    beyond the head's vocabulary, are not penalised: they cannot be generated)."""
    vlm = make_vlm()
    batch = vlm.processor("What is it?", [picture(3)])
    assert int(batch["input_ids"].max()) >= vlm.decoder.vocab_size  # the image placeholder id
    with torch.no_grad():
        embeds = vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
    stops = set(vlm.decoder.config.eos_token_ids)
    answers = {}
    for penalty in (None, 3.0):
        tokens = vlm.decoder.generate(batch["input_ids"], inputs_embeds=embeds, max_new_tokens=20, repetition_penalty=penalty)
        new = tokens[0, batch["input_ids"].shape[1] :].tolist()
        new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
        answers[penalty] = vlm.tokenizer.decode(new, skip_special_tokens=True)
        assert vlm.generate("What is it?", [picture(3)], max_new_tokens=20, repetition_penalty=penalty) == answers[penalty]
    assert answers[None] != answers[3.0]


def test_string_and_raw_prompts_reach_generation_as_the_processor_encodes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    vlm = make_vlm()
    prompts = spy_on_prompts(monkeypatch)
    vlm.generate("<image>\nWhat colour?", [picture(3)], max_new_tokens=2)
    as_turn = vlm.processor([{"role": "user", "content": "<image>\nWhat colour?"}], [picture(3)])["input_ids"]
    assert torch.equal(prompts[-1], as_turn)
    list(vlm.stream("The picture <image> shows", [picture(3)], max_new_tokens=2, raw=True))
    raw = vlm.processor("The picture <image> shows", [picture(3)], raw=True)["input_ids"]
    assert torch.equal(prompts[-1], raw)
    assert not torch.equal(raw, vlm.processor("The picture <image> shows", [picture(3)])["input_ids"])


def test_stream_decodes_each_token_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """O(n) streaming: the tokens decoded over a whole answer grow linearly with its length."""
    vlm = make_vlm()
    vlm.decoder.config = vlm.decoder.config.replace(eos_token_ids=[])  # always max_new_tokens
    decoded: list[int] = []
    decode = vlm.tokenizer.decode
    monkeypatch.setattr(vlm.tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    pieces = list(vlm.stream("What is it?", [picture(3)], max_new_tokens=300, **SAMPLED))
    assert len(pieces) > 30
    assert sum(decoded) < 10 * 300  # re-decoding the answer at every step would be ~300**2 / 2


def test_bad_generation_options_are_config_errors_naming_the_field() -> None:
    vlm = make_vlm()
    for field, value in {"temperature": -1.0, "top_k": 0, "top_p": 2.0, "repetition_penalty": 0.0, "seed": -1,
                         "max_new_tokens": -2, "stop": [""]}.items():  # fmt: skip
        with pytest.raises(ConfigError, match=f"invalid SamplingConfig: {field}"):
            vlm.stream("Hi", **{field: value})  # raised at the call, before any piece is asked for
        with pytest.raises(ConfigError, match=field):
            vlm.generate("Hi", **{field: value})


def test_save_and_load_give_identical_logits(vlm: VLM, tmp_path: Path) -> None:
    batch = vlm.processor("Describe <image>", [picture(6)])
    with torch.no_grad():
        before = vlm(**batch).logits
    folder = vlm.save_pretrained(tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    for loaded in (load_vlm(folder), load_vlm(f"local-dir:{folder}"), tinyvlm.VLM.from_pretrained(folder)):
        assert loaded.config == vlm.config
        with torch.no_grad():
            after = loaded(**loaded.processor("Describe <image>", [picture(6)])).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["schema_version"] == 2 and saved["parts"]["projector"]["config"]["factor"] == 2


def test_load_from_a_hub_repo(hub, tmp_path: Path) -> None:
    vlm = make_vlm("test-dinov3", "test-llama")
    folder = vlm.save_pretrained(tmp_path / "model")
    hub.add_folder("me/tiny-vlm", folder)
    loaded = load_vlm("hf-hub:me/tiny-vlm")
    batch = vlm.processor("Hi <image>", [picture(7)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, vlm(**batch).logits, rtol=0, atol=0)


def test_save_replaces_a_model_folder_only_when_asked_and_never_other_folders(tmp_path: Path) -> None:
    vlm = make_vlm()
    target = tmp_path / "out"
    vlm.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a saved model: pass overwrite=True"):
        vlm.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    vlm.save_pretrained(target, overwrite=True)
    assert not (target / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left
    (tmp_path / "empty").mkdir()
    vlm.save_pretrained(tmp_path / "empty")  # an existing empty folder is free
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no config.json, so it is not a saved model"):
        vlm.save_pretrained(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_push_to_hub_uploads_the_folder_and_a_model_card(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, *, repo_id, folder_path, commit_message):
            files = {p.name: p.read_text() if p.suffix in {".md", ".json"} else None for p in Path(folder_path).iterdir()}
            calls.append(("upload_folder", {"repo_id": repo_id, "files": files}))
            return type("Commit", (), {"commit_url": "https://hub/me/tiny/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    vlm = make_vlm("test-dinov3", "test-gemma3")
    assert vlm.push_to_hub("me/tiny", private=True) == "https://hub/me/tiny/commit/1"
    assert calls[1] == ("create_repo", {"repo_id": "me/tiny", "private": True, "exist_ok": True})
    files = calls[2][1]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    card = files["README.md"]
    assert "library_name: tinyvlm" in card and "`test-dinov3`" in card and "`test-gemma3`" in card
    assert 'load_vlm("hf-hub:me/tiny")' in card


def test_image_splitting_grows_the_vocabulary_for_markers_only() -> None:
    vocab = tinyvlm.get_spec("test-llama").config.vocab_size
    plain = make_vlm(processor_kwargs={"token_layout": "nanovlm"})
    assert plain.decoder.vocab_size == vocab  # <|image|> needs no row
    smolvlm = make_vlm()  # SmolVLM's layout, the pair's default: its wrap and global-view tokens are text
    assert smolvlm.decoder.vocab_size == vocab + 2 and smolvlm.image_token_id >= smolvlm.decoder.vocab_size
    split = make_vlm(processor_kwargs={"token_layout": "nanovlm", "split_images": True, "max_grid": 2})
    markers = split.config.parts.marker_token_ids
    assert len(markers) == 1 + 4 and split.decoder.vocab_size == max(markers) + 1
    assert split.image_token_id >= split.decoder.vocab_size
    big = picture(8, size=(120, 100))
    batch = split.processor("<image>What?", [big])
    assert batch["pixel_values"].shape[0] == 5
    assert isinstance(split.generate("<image>What?", [big], max_new_tokens=3), str)


def test_default_factor_and_projectors() -> None:
    vlm = make_vlm(projector_kwargs={})
    assert vlm.projector.factor == 1  # 8x8 grid: 2 or 4 would leave fewer than 49 tokens
    mlp = make_vlm(projector="mlp", projector_kwargs={})
    assert mlp.projector.tokens_per_image((8, 8)) == 64
    linear = make_vlm(projector="pixel-shuffle-linear", projector_kwargs={"factor": 4})
    assert linear.processor.tokens_per_view == 4


def test_parts_that_do_not_fit_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="in_dim is 10 but the encoder 'test-siglip' gives tokens of width 64"):
        make_vlm(projector_kwargs={"factor": 2, "in_dim": 10})
    with pytest.raises(ConfigError, match="out_dim is 7 but the decoder 'test-llama' has width 64"):
        make_vlm(projector_kwargs={"factor": 2, "out_dim": 7})
    with pytest.raises(ConfigError, match=r"factor 3 does not divide .* 8x8 .*: 1, 2, 4, 8"):
        make_vlm(projector_kwargs={"factor": 3})
    with pytest.raises(ConfigError, match="floating-point"):
        build_vlm("test-siglip", "test-llama", pretrained=False, dtype=torch.int64)


def test_token_feature_count_mismatch_is_a_clear_error() -> None:
    vlm = make_vlm()
    batch = vlm.processor("<image> and <image>", [picture(1), picture(2)])
    with pytest.raises(DataError, match=r"hold 32 image tokens but pixel_values give 1 view\(s\) x 16"):
        vlm(batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(DataError, match="no pixel_values"):
        vlm(batch["input_ids"])


def test_bf16_decoder_with_fp32_encoder() -> None:
    torch.manual_seed(0)
    vlm = build_vlm("test-siglip", "test-gemma3", pretrained=False, decoder_kwargs={}, projector_kwargs={"factor": 2})
    vlm.decoder.to(torch.bfloat16)
    out = vlm(**vlm.processor("<image>hi", [picture(9)]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ------------------------------------------------------------------------------------------------ recipes

RECIPES = ["nanovlm-222m", "nanovlm-460m", "dinov3-gemma3-270m", "test-vlm"]


def test_recipes_are_listed_as_vlms() -> None:
    keys = [s.key for s in tinyvlm.list_models(kind="vlm")]
    assert set(RECIPES) <= set(keys)
    for key in RECIPES:
        spec = tinyvlm.get_spec(key)
        assert spec.kind == "vlm" and not spec.trained and isinstance(spec.config, VLMConfig)
        assert spec.config.training.lr_projector == 5.12e-3 and spec.config.training.lr_decoder == 5e-5


def test_recipe_param_counts_match_the_prior_art() -> None:
    """nanoVLM-222M: SigLIP-B/16 vision 85,797,120 + SmolLM2-135M 134,515,008 + projector (768*4) x 576;
    the fork's DINOv3-S/16+ + Gemma-3-270m projector: 983,040 (384*4 x 640)."""
    assert tinyvlm.get_spec("nanovlm-222m").params == 85_797_120 + 134_515_008 + 3072 * 576
    spec = tinyvlm.get_spec("dinov3-gemma3-270m")
    parts = tinyvlm.get_spec("dinov3-vits16plus").params + tinyvlm.get_spec("gemma-3-270m-it").params
    assert spec.params == parts + 983_040 and spec.dim == 640
    # nanovlm-460m: SigLIP2-B/16-512 86,433,024 + SmolLM2-360M 361,821,120 + 11,796,480 (the fork's log),
    # before the 17 marker rows its tokenizer adds
    assert tinyvlm.get_spec("nanovlm-460m").params == 86_433_024 + 361_821_120 + 11_796_480


def test_recipe_builds_by_name_with_overrides_and_a_config_object_is_refused() -> None:
    vlm = build_vlm("test-vlm", pretrained=False)
    assert vlm.projector.factor == 2 and vlm.config.encoder == "test-siglip"
    other = build_vlm("test-vlm", projector="mlp", pretrained=False, projector_kwargs={"factor": 1})
    assert other.projector.factor == 1 and other.config.projector == "mlp"
    overridden = build_vlm("test-vlm", pretrained=False, projector_kwargs={"factor": 4})
    assert overridden.projector.factor == 4
    edited = tinyvlm.get_spec("test-vlm").config.replace(decoder="test-gemma3")
    refused = r"^build_vlm takes names .* not a VLMConfig: register it as a recipe \(tinyvlm.register_model\)"
    with pytest.raises(ConfigError, match=refused):
        build_vlm(edited, pretrained=False)


def test_recipes_build_on_meta_without_downloads() -> None:
    from tinyvlm.registry import get_family

    for key in RECIPES:
        with torch.device("meta"):
            module = get_family("vlm").build(tinyvlm.get_spec(key).config)
        assert module.dim == tinyvlm.get_spec(key).dim


def test_untrained_recipe_cannot_be_loaded() -> None:
    with pytest.raises(ConfigError, match="is a recipe .*build_vlm"):
        load_vlm("nanovlm-222m")


def test_a_config_json_of_schema_1_reads_its_token_layout(tmp_path: Path) -> None:
    """Folders saved before ``image_tokens.layout`` became ``token_layout`` (schema 1) still load."""
    vlm = build_vlm("test-vlm", pretrained=False, processor_kwargs={"token_layout": "smolvlm", "image_token": "<image>",
                                                                   "global_image_token": "<global-img>"})
    folder = vlm.save_pretrained(tmp_path / "model")
    saved = json.loads((folder / "config.json").read_text())
    saved["schema_version"] = 1
    saved["image_tokens"]["layout"] = saved["image_tokens"].pop("token_layout")
    (folder / "config.json").write_text(json.dumps(saved))
    loaded = load_vlm(folder)
    assert loaded.config.image_tokens.token_layout == "smolvlm" and loaded.config.schema_version == 2
    with pytest.raises(ConfigError, match="unknown ImageTokenConfig field.*layout.*Valid fields: .*token_layout"):
        loaded.config.image_tokens.replace(layout="nanovlm")


def test_save_pretrained_in_an_unknown_layout_names_the_layouts(tmp_path: Path) -> None:
    vlm = build_vlm("test-vlm", pretrained=False)
    with pytest.raises(ConfigError, match=r"^layout='onnx': a vlm is saved in 'transformers' \(tinyvlm's own: 'tinyvlm'\)"):
        vlm.save_pretrained(tmp_path / "x", layout="onnx")
    with pytest.raises(ConfigError, match=r"^layout='tinyvlm': a decoder is saved in 'transformers'$"):
        vlm.decoder.save_pretrained(tmp_path / "y", layout="tinyvlm")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
