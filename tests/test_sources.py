"""The resolver (`tinyvlm.sources`): every name form is parsed in one place, and a Hub repo is resolved once
per build and pinned, so weights, tokenizer, generation config and the recorded revision all come from one
commit even while the branch moves during the build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tinyvlm
from tinyvlm.errors import HubError, UnknownModelError
from tinyvlm.sources import ASSETS, resolve

ENCODER_REPO = "tiny-org/siglip"
DECODER_REPO = "tiny-org/llama"


def write_siglip(folder: Path, seed: int) -> None:
    """A tiny ``SiglipVisionModel`` saved by transformers 5."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=8)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(folder)


def write_llama(folder: Path, seed: int, *, chat_template: str) -> None:
    """A tiny ``LlamaForCausalLM`` saved by transformers 5 (``rope_parameters``), with test-llama's tokenizer
    files and a ``chat_template.jinja`` as transformers 5 saves templates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "test-llama" / name, folder / name)
    (folder / "chat_template.jinja").write_text(chat_template)


def publish_encoder(hub, tmp_path: Path, seed: int) -> str:
    write_siglip(tmp_path / f"enc-{seed}", seed)
    return hub.add_folder(ENCODER_REPO, tmp_path / f"enc-{seed}")


def publish_decoder(hub, tmp_path: Path, seed: int) -> str:
    write_llama(tmp_path / f"dec-{seed}", seed, chat_template=f"template of commit {seed}{{{{ messages[0]['content'] }}}}")
    return hub.add_folder(DECODER_REPO, tmp_path / f"dec-{seed}")


def test_build_vlm_resolves_each_repo_once_and_pins_every_file(hub, tmp_path: Path) -> None:
    encoder_commit, decoder_commit = publish_encoder(hub, tmp_path, 1), publish_decoder(hub, tmp_path, 1)
    moved: set[str] = set()

    def move_main_once_resolved(method: str, path: str) -> None:
        """Each repo's main moves on right after the build first asked for it."""
        for repo, publish in ((ENCODER_REPO, publish_encoder), (DECODER_REPO, publish_decoder)):
            if path.startswith(f"/{repo}/") and repo not in moved:
                moved.add(repo)
                publish(hub, tmp_path, 2)

    hub.after_request = move_main_once_resolved
    vlm = tinyvlm.build_vlm(f"hf-hub:{ENCODER_REPO}", f"hf-hub:{DECODER_REPO}")
    hub.after_request = None
    heads_at_main = [path for method, path in hub.requests if method == "HEAD" and "/resolve/main/" in path]
    assert heads_at_main == [f"/{ENCODER_REPO}/resolve/main/config.json", f"/{DECODER_REPO}/resolve/main/config.json"]
    for repo, commit in ((ENCODER_REPO, encoder_commit), (DECODER_REPO, decoder_commit)):
        others = [path for _, path in hub.requests if path.startswith(f"/{repo}/") and not path.endswith("/config.json")]
        assert others and all(path.startswith(f"/{repo}/resolve/{commit}/") for path in others), others
    assert vlm.tokenizer.chat_template.startswith("template of commit 1")  # not the commit main moved to
    assert vlm.config.parts.encoder.revision == encoder_commit
    assert vlm.config.parts.decoder.revision == decoder_commit
    pinned = tinyvlm.build_decoder(f"hf-hub:{DECODER_REPO}@{decoder_commit}", dtype=torch.float32)
    loaded = vlm.decoder.embed_tokens.weight[: pinned.vocab_size]  # then rows for SmolVLM's image markers
    torch.testing.assert_close(loaded, pinned.embed_tokens.weight, rtol=0, atol=0)
    moved_on = tinyvlm.build_decoder(f"hf-hub:{DECODER_REPO}", dtype=torch.float32)
    assert not torch.equal(loaded, moved_on.embed_tokens.weight)  # main did move


def test_requests_per_build(hub, tmp_path: Path, offline_switch) -> None:
    """Cold: each file once; warm: one HEAD per repo (the moving branch, resolved once); offline: none."""
    publish_encoder(hub, tmp_path, 1)
    publish_decoder(hub, tmp_path, 1)
    tinyvlm.build_vlm(f"hf-hub:{ENCODER_REPO}", f"hf-hub:{DECODER_REPO}")
    fetched = [path for method, path in hub.requests if method == "GET"]
    assert len(fetched) == len(set(fetched))  # nothing downloaded twice
    hub.requests.clear()
    tinyvlm.build_vlm(f"hf-hub:{ENCODER_REPO}", f"hf-hub:{DECODER_REPO}")
    assert hub.requests == [("HEAD", f"/{ENCODER_REPO}/resolve/main/config.json"),
                            ("HEAD", f"/{DECODER_REPO}/resolve/main/config.json")]  # fmt: skip
    offline_switch()
    hub.requests.clear()
    tinyvlm.build_vlm(f"hf-hub:{ENCODER_REPO}", f"hf-hub:{DECODER_REPO}")
    assert hub.requests == []


def test_a_saved_folder_is_a_name_without_a_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vlm = tinyvlm.build_vlm("test-siglip", "test-llama")
    vlm.save_pretrained(tmp_path / "my-vlm")
    monkeypatch.chdir(tmp_path)
    source = resolve("my-vlm")
    assert source.local_dir == Path("my-vlm") and source.has_files
    assert tinyvlm.load_vlm("my-vlm").config == tinyvlm.load_vlm(f"local-dir:{tmp_path / 'my-vlm'}").config
    with pytest.raises(UnknownModelError, match="local-dir:"):
        resolve("./not-there")


def test_zoo_keys_win_over_folders_of_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "test-llama").mkdir()
    (tmp_path / "test-llama" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve("test-llama").spec is not None
    assert resolve("./test-llama").local_dir == Path("test-llama")


def test_random_init_entries_have_no_files_but_a_shipped_tokenizer() -> None:
    source = resolve("test-llama")
    assert not source.has_files and source.commit is None
    assert (source.tokenizer_folder() / "tokenizer.json").is_file()
    with pytest.raises(HubError, match="random-init"):
        source.weight_files()


def test_tokenizer_only_repo_is_pinned_by_its_tokenizer(hub, tmp_path: Path) -> None:
    from tinyvlm.sources import tokenizer_source

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(ASSETS / "test-llama" / "tokenizer.json", folder / "tokenizer.json")
    commit = hub.add_folder("tiny-org/tokenizer", folder)
    source = tokenizer_source("tiny-org/tokenizer")
    assert source.tokenizer_folder().name == commit == source.commit
    assert not any(path.endswith("/config.json") for _, path in hub.requests)  # no config.json in such a repo


# ------------------------------------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A finished training run of test-vlm, a LoRA run on its model, and a training image."""
    from tinyvlm.demo import make_shapes_dataset

    root = tmp_path_factory.mktemp("runs")
    data = make_shapes_dataset(root / "data", count=12, seed=0)
    short = dict(data=data, max_steps=2, batch_size=2, grad_accum=1, progress=False, eval_samples=0,
                 checkpoint_every=0, device="cpu")
    tinyvlm.train(model="test-vlm", output=root / "full", **short)
    tinyvlm.train(model=str(root / "full"), output=root / "lora", lora=2, train="projector", **short)
    return root / "full", root / "lora", data.parent / "images" / "00000.png"


def test_a_run_folder_names_its_final_model(runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinyvlm.cli import main

    run, _, image = runs
    for name in (str(run), f"local-dir:{run}"):
        assert resolve(name).local_dir == run / "model"
    batch = tinyvlm.load_vlm(run / "model").processor("What colour is the shape?", [image])
    with torch.no_grad():
        assert torch.equal(tinyvlm.load_vlm(str(run))(**batch).logits, tinyvlm.load_vlm(run / "model")(**batch).logits)
    answers = []
    for name in (str(run), str(run / "model")):
        capsys.readouterr()
        assert main(["generate", "--model", name, "--image", str(image), "--prompt", "What colour?",
                     "--max-new-tokens", "3"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "idefics3"


def test_a_lora_run_folder_names_its_adapter(runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinyvlm.cli import main

    run, lora, image = runs
    by_run = tinyvlm.load_vlm(str(run), adapter=lora)
    by_folder = tinyvlm.load_vlm(run / "model", adapter=lora / "adapter")
    batch = by_folder.processor("What colour is the shape?", [image])
    with torch.no_grad():
        assert torch.equal(by_run(**batch).logits, by_folder(**batch).logits)
    assert main(["merge", str(run), str(lora), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    with pytest.raises(HubError, match=r"is a LoRA run: its adapter \(.*adapter\) goes on the base it was trained on"):
        resolve(str(lora))


def test_an_unfinished_run_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(HubError, match="has not saved its final model .* yet"):
        resolve(str(tmp_path))
