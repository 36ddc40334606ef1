"""The doors (`tinyvlm.api`): the parts' doors on the test-only tiny family (name forms, overrides, random
init, dtype, kind checks); the same weights give the same bits whichever door they came through; a name is
resolved once on the way in; ``threads=`` never changes the process's thread count; and what is left of the
VLM entry points is the two doors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from tiny_family import TinyConfig, TinyModule, checkpoint_tensors, write_checkpoint

import tinyvlm
from tinyvlm import sources
from tinyvlm.api import build_decoder, build_encoder, build_vlm, load_vlm, part_config
from tinyvlm.errors import ConfigError, UnknownModelError
from tinyvlm.sources import resolve
from tinyvlm.interop.lora import add_lora, save_adapter
from tinyvlm.interop.lora_settings import LoraSettings

# ------------------------------------------------------------------------------------------------ parts


def test_random_init_entry_with_overrides(tiny_zoo):
    tiny_zoo("test-tiny")
    torch.manual_seed(0)
    module = build_encoder("test-tiny", dim=4, hidden=6)
    assert isinstance(module, TinyModule) and module.dim == 4 and module.fc.weight.shape == (6, 4)
    assert not module.training
    torch.manual_seed(0)
    again = build_encoder("test-tiny", dim=4, hidden=6)
    assert torch.equal(module.fc.weight, again.fc.weight)


def test_unknown_override_names_it_and_the_valid_fields(tiny_zoo):
    tiny_zoo("test-tiny")
    with pytest.raises(ConfigError, match=r"unknown TinyConfig field\(s\): width. Valid fields: dim, hidden"):
        build_encoder("test-tiny", width=3)
    with pytest.raises(ConfigError, match=r"dim: Input should be a multiple of 2"):
        build_encoder("test-tiny", dim=3)


def test_dtype_and_device(tiny_zoo, tmp_path):
    tiny_zoo("test-tiny")
    assert build_encoder("test-tiny", dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16
    write_checkpoint(tmp_path / "ckpt")
    loaded = build_encoder(f"local-dir:{tmp_path / 'ckpt'}", dtype=torch.bfloat16, device="cpu")
    assert loaded.fc.weight.dtype == torch.bfloat16 and loaded.fc.weight.device.type == "cpu"
    assert torch.equal(loaded.fc.weight, checkpoint_tensors(TinyConfig())["model.fc.weight"].bfloat16())


def test_local_dir_pretrained_false_reads_config_only(tiny_zoo, tmp_path):
    write_checkpoint(tmp_path / "ckpt", TinyConfig(dim=6, hidden=10))
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    module = build_encoder(f"local-dir:{tmp_path / 'ckpt'}", pretrained=False)
    assert module.dim == 6


def test_local_dir_overrides_that_break_the_weights(tiny_zoo, tmp_path):
    from tinyvlm.errors import WeightsError

    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_encoder(f"local-dir:{tmp_path / 'ckpt'}", hidden=12)


def test_kind_is_checked(tiny_zoo, tmp_path):
    tiny_zoo("test-tiny")
    with pytest.raises(UnknownModelError, match="'test-tiny' is an encoder, not a decoder. Pass it where an encoder is expected"):
        build_decoder("test-tiny")
    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"config.json describes an encoder \(tiny family\), not a decoder"):
        build_decoder(f"local-dir:{tmp_path / 'ckpt'}")


def test_config_without_model_type(tiny_zoo, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json has no model_type, which is not a supported encoder family"):
        part_config("encoder", resolve(f"local-dir:{tmp_path}"), {})


# ------------------------------------------------------------------------------------------------ VLMs

#: Matrices wide enough that their weight layout changes how a product of a few rows adds up (the tiny
#: test-llama's would not show it).
WIDE = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)
IDS = torch.tensor([[1, 17, 42]])  # a short prompt: few rows, where the layouts differ


@pytest.fixture(scope="module")
def built() -> tinyvlm.VLM:
    torch.manual_seed(0)
    return build_vlm("test-siglip", "test-llama", decoder_kwargs=WIDE, dtype=torch.float32)


@pytest.fixture(scope="module")
def saved(built: tinyvlm.VLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built.save_pretrained(tmp_path_factory.mktemp("doors") / "model")


def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a short prompt and greedy tokens (a decoder's, or a VLM's decoder's)."""
    decoder = getattr(model, "decoder", model)
    with torch.no_grad():
        return decoder(IDS).logits, decoder.generate(IDS, max_new_tokens=6, eos_token_id=[])


def test_build_save_load_give_the_same_bits(built: tinyvlm.VLM, saved: Path) -> None:
    logits, tokens = outputs(built)
    for loaded in (load_vlm(saved), tinyvlm.VLM.from_pretrained(saved)):
        again_logits, again_tokens = outputs(loaded)
        assert torch.equal(again_logits, logits)
        assert torch.equal(again_tokens, tokens)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, built(IDS).logits)  # the VLM's own forward too


def test_a_decoder_door_gives_the_bits_of_the_vlms_decoder(built: tinyvlm.VLM, tmp_path: Path) -> None:
    folder = built.decoder.save_pretrained(tmp_path / "decoder", tokenizer=built.tokenizer)
    decoder = build_decoder(f"local-dir:{folder}", dtype=torch.float32)
    logits, tokens = outputs(built)
    assert torch.equal(outputs(decoder)[0], logits) and torch.equal(outputs(decoder)[1], tokens)


def test_from_pretrained_is_load_vlm() -> None:
    assert tinyvlm.VLM.from_pretrained is tinyvlm.load_vlm


def test_the_two_vlm_doors_are_all_there_is() -> None:
    import tinyvlm.api
    import tinyvlm.vlm
    import tinyvlm.vlm.model

    public = {name for name in vars(tinyvlm.api) if not name.startswith("_")}
    assert {"build_vlm", "load_vlm"} <= public
    assert not {"open_vlm", "with_adapter", "read_vlm", "recipe_config"} & public
    assert not hasattr(tinyvlm.vlm.model.VLM, "from_config") and "open_vlm" not in tinyvlm.vlm.__all__


def test_a_recipe_is_built_not_loaded_and_a_saved_model_loaded_not_built(saved: Path) -> None:
    with pytest.raises(ConfigError, match=r"'test-vlm' is a recipe \(untrained\): build it with tinyvlm.build_vlm"):
        load_vlm("test-vlm")
    with pytest.raises(ConfigError, match=r"is a trained VLM: load it with tinyvlm.load_vlm"):
        build_vlm(f"local-dir:{saved}")


# -------------------------------------------------------------------------------------- one resolution


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], int]]:
    """Count `tinyvlm.sources.resolve` calls by name, wherever a module imported it."""
    calls: list[str] = []
    original = sources.resolve

    def counting(name: str, kind=None):  # type: ignore[no-untyped-def]
        calls.append(name)
        return original(name, kind)

    for module in [m for name, m in sys.modules.items() if name == "tinyvlm" or name.startswith("tinyvlm.")]:
        if getattr(module, "resolve", None) is original:
            monkeypatch.setattr(module, "resolve", counting)
    yield calls.count


def test_a_loaded_name_is_resolved_once(saved: Path, tmp_path: Path, resolved: Callable[[str], int]) -> None:
    vlm = load_vlm(saved)
    add_lora(vlm, LoraSettings(rank=2))
    adapter = save_adapter(vlm, tmp_path / "adapter")
    name = f"local-dir:{saved}"
    load_vlm(name)
    assert resolved(name) == 1
    load_vlm(name, adapter=adapter)
    assert resolved(name) == 2  # once more for the second load, once only with the adapter


def test_a_recipe_and_its_parts_are_resolved_once_each(resolved: Callable[[str], int]) -> None:
    build_vlm("test-vlm", pretrained=False)
    assert (resolved("test-vlm"), resolved("test-siglip"), resolved("test-llama")) == (1, 1, 1)


def test_the_generate_command_resolves_its_model_once(saved: Path, resolved: Callable[[str], int], capsys) -> None:
    from tinyvlm.cli import main

    name = f"local-dir:{saved}"
    assert main(["generate", "--model", name, "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert resolved(name) == 1


# ------------------------------------------------------------------------------------------------ threads


def test_threads_apply_to_the_work_and_never_change_the_process_count(saved: Path) -> None:
    before = torch.get_num_threads()
    if before == 1:
        torch.set_num_threads(2)  # so that threads=1 would show
        before = 2
    seen: list[int] = []
    decoder = build_decoder("test-llama", pretrained=False, threads=1)
    assert torch.get_num_threads() == before
    vlm = build_vlm("test-vlm", pretrained=False, threads=1)
    assert torch.get_num_threads() == before
    loaded = load_vlm(saved, threads=1)
    assert torch.get_num_threads() == before
    for model in (decoder, vlm.decoder, loaded.decoder):
        hook = model.norm.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        model.generate(IDS.clamp(max=model.vocab_size - 1), max_new_tokens=3, eos_token_id=[])
        hook.remove()
        assert torch.get_num_threads() == before
    assert seen and set(seen) == {1}  # every step ran on the one thread asked for
    vlm.generate("Hi", max_new_tokens=2)
    assert torch.get_num_threads() == before
