"""LoRA adapters through peft (`tinyvlm.interop.lora`): fewer trainable parameters, files in peft's own
format read by peft and read from peft, bit-identical round trips, merges equal to base + delta, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tinyvlm
from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.interop.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    count_parameters,
    lora_layers,
    merge_adapter,
    save_adapter,
)
from tinyvlm.interop.lora_settings import LoraSettings
from tinyvlm.vlm.model import assemble

peft = pytest.importorskip("peft")

ALL_PARTS = LoraSettings(rank=4, alpha=8, parts=("encoder", "decoder"))


def spread_(module: torch.nn.Module, seed: int, *, matrices: float = 0.2, lora_only: bool = False) -> None:
    """Weights at which every layer matters: matrices N(0, matrices^2 / fan_in), norms 1 + N(0, 0.2^2), biases
    N(0, 0.1^2); ``lora_only`` sets LoRA B (zero when fresh) and the projector, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if lora_only and not ("lora_B" in name or name.startswith("projector.")):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise * matrices / math.sqrt(param.shape[-1]))
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved test-vlm (SigLIP + MLP projector + Llama twin) with spread-out weights: the base of the adapters."""
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-vlm", dtype=torch.float32)
    spread_(vlm, 0)
    return vlm.save_pretrained(tmp_path_factory.mktemp("base") / "model")


def inputs(vlm) -> dict[str, torch.Tensor]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return vlm.processor("What colour is the square?", [image])


def logits(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module(batch["input_ids"], batch["pixel_values"]).logits


def adapted(base: Path, settings: LoraSettings = ALL_PARTS, seed: int = 1):
    """The base with a "trained" adapter (LoRA B and the projector set as training would)."""
    vlm = tinyvlm.load_vlm(base)
    add_lora(vlm, settings, base_name=str(base))
    spread_(vlm, seed, lora_only=True)
    return vlm


# ------------------------------------------------------------------------------------------ parameters


def lora_parameter_count(settings: LoraSettings, layers: dict[str, torch.nn.Module]) -> int:
    return sum(settings.rank * (layer.in_features + layer.out_features) for layer in layers.values())


def test_lora_trains_fewer_parameters_on_nanovlm_222m_shapes() -> None:
    """nanovlm-222m (SigLIP-B/16-224 + SmolLM2-135M + shuffle-2 Linear) built on the meta device, rank 8 on
    every decoder linear of the blocks: trainable = r (in + out) per adapted layer + the projector."""
    config = tinyvlm.get_spec("nanovlm-222m").config
    with torch.device("meta"):
        vlm = assemble(config)
    settings = LoraSettings(rank=8)
    add_lora(vlm, settings)
    layers = lora_layers(vlm)
    decoder = vlm.decoder.config
    assert len(layers) == 7 * decoder.num_layers
    assert all(name.startswith("decoder.layers.") for name in layers)
    expected = lora_parameter_count(settings, layers) + sum(p.numel() for p in vlm.projector.parameters())
    trainable, total = count_parameters(vlm)
    assert trainable == expected
    assert all(p.requires_grad == (".lora_" in n or n.startswith("projector.")) for n, p in vlm.named_parameters())
    assert trainable / total < 0.02  # 4.2M of 226M
    print(f"nanovlm-222m, rank 8, q,k,v,o,gate,up,down of the decoder + the projector: {trainable:,} trainable of "
          f"{total:,} ({100 * trainable / total:.2f} %)")


def test_encoder_targets_map_onto_siglip_names(base: Path) -> None:
    vlm = tinyvlm.load_vlm(base)
    settings = LoraSettings(rank=2, parts=("encoder",), targets=("q", "gate", "up", "down"))
    add_lora(vlm, settings)
    names = set(lora_layers(vlm))
    layers = range(vlm.encoder.config.num_hidden_layers)
    expected = {f"encoder.layers.{i}.{leaf}" for i in layers for leaf in ("self_attn.q_proj", "mlp.fc1", "mlp.fc2")}
    assert names == expected  # gate: SigLIP's MLP is not gated, so nothing there
    with pytest.raises(ConfigError, match="match no linear layer"):
        add_lora(tinyvlm.load_vlm(base), LoraSettings(rank=2, parts=("encoder",), targets=("gate",)))


def test_fresh_adapter_keeps_the_outputs_and_freezes_the_base(base: Path) -> None:
    vlm = tinyvlm.load_vlm(base)
    batch = inputs(vlm)
    before = logits(vlm, batch)
    add_lora(vlm, ALL_PARTS, full_parts=("projector",))
    assert torch.equal(logits(vlm, batch), before)  # B starts at zero
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable) and any(n.startswith("encoder.") for n in trainable)


# ---------------------------------------------------------------------------------------- peft's format


def test_files_are_what_peft_saves_for_the_same_module(base: Path, tmp_path: Path) -> None:
    """peft's own PeftModel.save_pretrained of the same VLM with the same weights writes the same files."""
    ours = adapted(base)
    save_adapter(ours, tmp_path / "ours")
    config = ours.peft_config["default"]
    module = tinyvlm.load_vlm(base)
    module.name_or_path = str(base)  # peft records this (a transformers model's) as base_model_name_or_path
    reference = peft.get_peft_model(
        module,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=config.target_modules, modules_to_save=["projector"],
                        base_model_name_or_path=str(base)),
    )
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
             for k, v in load_file(str(tmp_path / "ours" / ADAPTER_WEIGHTS)).items()}
    own = reference.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            key = key.replace("base_model.model.projector.", "base_model.model.projector.modules_to_save.default.")
            own[key].copy_(value)
    reference.save_pretrained(tmp_path / "peft")

    ours_json = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    peft_json = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert ours_json == peft_json
    assert (tmp_path / "ours" / ADAPTER_CONFIG).read_text() == (tmp_path / "peft" / ADAPTER_CONFIG).read_text()
    assert ours_json["peft_type"] == "LORA" and ours_json["r"] == 4 and ours_json["modules_to_save"] == ["projector"]
    assert ours_json["auto_mapping"] == {"base_model_class": "VLM", "parent_library": "tinyvlm.vlm.model"}
    ours_tensors = load_file(str(tmp_path / "ours" / ADAPTER_WEIGHTS))
    peft_tensors = load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    assert ours_tensors.keys() == peft_tensors.keys()
    assert all(torch.equal(ours_tensors[k], peft_tensors[k]) for k in ours_tensors)
    key = "base_model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    assert ours_tensors[key].shape == (4, ours.decoder.dim)  # [r, in]
    assert ours_tensors[key.replace("q_proj.lora_A", "k_proj.lora_B")].shape == (
        ours.decoder.config.num_kv_heads * ours.decoder.config.head_dim, 4)  # [out, r]
    with safe_open(str(tmp_path / "ours" / ADAPTER_WEIGHTS), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_peft_reads_our_adapter(base: Path, tmp_path: Path) -> None:
    ours = adapted(base)
    batch = inputs(ours)
    expected = logits(ours, batch)
    assert not torch.equal(expected, logits(tinyvlm.load_vlm(base), batch))  # the adapter changes the outputs
    save_adapter(ours, tmp_path / "adapter")

    by_peft = peft.PeftModel.from_pretrained(tinyvlm.load_vlm(base), str(tmp_path / "adapter"))
    assert torch.equal(logits(by_peft, batch), expected)

    config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    module = tinyvlm.load_vlm(base)
    module.name_or_path = config.base_model_name_or_path  # else peft warns that it renames it to None
    model = peft.get_peft_model(module, config)
    result = peft.set_peft_model_state_dict(model, load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))
    assert not result.unexpected_keys
    assert torch.equal(logits(model, batch), expected)


def test_we_read_an_adapter_peft_saved(base: Path, tmp_path: Path) -> None:
    model = peft.get_peft_model(
        tinyvlm.load_vlm(base),
        peft.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj", "fc2"],
                        modules_to_save=["projector"]),
    )
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "peft")
    loaded = tinyvlm.load_vlm(base, adapter=tmp_path / "peft")
    batch = inputs(loaded)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert len(lora_layers(loaded)) == 2 * (loaded.encoder.config.num_hidden_layers + loaded.decoder.config.num_layers) \
        + loaded.encoder.config.num_hidden_layers  # q, v everywhere; fc2 in the encoder's MLP only


# --------------------------------------------------------------------------------------- round trips


def test_adapter_round_trip_is_bit_identical(base: Path, tmp_path: Path) -> None:
    ours = adapted(base)
    save_adapter(ours, tmp_path / "adapter")
    loaded = tinyvlm.load_vlm(base, adapter=tmp_path / "adapter")
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    restored = dict(loaded.named_parameters())
    assert len(trained) > 10
    for name, value in trained.items():
        assert torch.equal(restored[name], value), name
    batch = inputs(ours)
    assert torch.equal(logits(loaded, batch), logits(ours, batch))
    assert loaded.generate("What colour?", [Image.new("RGB", (64, 64))], max_new_tokens=5) == \
        ours.generate("What colour?", [Image.new("RGB", (64, 64))], max_new_tokens=5)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert tinyvlm.VLM.from_pretrained(base, adapter=tmp_path / "adapter") is not None
    # saving again replaces the adapter folder atomically, only when asked, and only an adapter folder
    with pytest.raises(ConfigError, match="already holds a saved model: pass overwrite=True"):
        save_adapter(loaded, tmp_path / "adapter")
    save_adapter(loaded, tmp_path / "adapter", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no adapter_config.json, so it is not a saved model"):
        save_adapter(loaded, tmp_path / "other", overwrite=True)
    with pytest.raises(ConfigError, match="LoRA adapter: save the adapter alone"):
        loaded.save_pretrained(tmp_path / "full")


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "alpha/sqrt(r)"])
def test_merged_model_equals_base_plus_delta(base: Path, tmp_path: Path, rslora: bool) -> None:
    settings = LoraSettings(rank=4, alpha=12, rslora=rslora, parts=("encoder", "decoder"))
    ours = adapted(base, settings)
    batch = inputs(ours)
    unmerged = logits(ours, batch)
    layer = ours.decoder.layers[1].mlp.down_proj
    scale = 12 / (math.sqrt(4) if rslora else 4)
    assert settings.scale == scale
    expected_weight = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    save_adapter(ours, tmp_path / "adapter")

    merged = merge_adapter(ours)
    assert not lora_layers(merged) and isinstance(merged.decoder.layers[1].mlp.down_proj, torch.nn.Linear)
    torch.testing.assert_close(merged.decoder.layers[1].mlp.down_proj.weight, expected_weight, rtol=0, atol=1e-6)
    merged_logits = logits(merged, batch)
    assert ((merged_logits - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-5
    assert not torch.equal(merged_logits, logits(tinyvlm.load_vlm(base), batch))

    from tinyvlm.cli import main

    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    from_cli = tinyvlm.load_vlm(tmp_path / "merged")
    assert ((logits(from_cli, batch) - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-5
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "tinyvlm"


def test_merge_replaces_a_saved_model_only_when_asked(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinyvlm.cli import main

    ours = tinyvlm.load_vlm(base)
    add_lora(ours, LoraSettings(rank=2))
    save_adapter(ours, tmp_path / "adapter")
    merged = tmp_path / "merged"
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(merged)]) == 0
    (merged / "notes.txt").write_text("mine")
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(merged)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a saved model: pass overwrite=True (--overwrite" in err
    assert (merged / "notes.txt").is_file() and (merged / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(merged), "--overwrite"]) == 0
    assert not (merged / "notes.txt").exists() and (merged / "model.safetensors").stat().st_mtime_ns != stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    with pytest.raises(ConfigError, match="already holds a saved model"):
        merge_adapter(tinyvlm.load_vlm(base, adapter=tmp_path / "adapter")).save_pretrained(merged)


# -------------------------------------------------------------------------------------------- errors


def test_bad_adapters_are_clear_errors(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = adapted(base, LoraSettings(rank=4))
    folder = save_adapter(ours, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        tinyvlm.load_vlm(base, adapter=tmp_path / "missing")

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    for change, message in [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "LoRA adapters"),
                            ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
                            ({"modules_to_save": ["lm_head"]}, "whole parts")]:
        bad = tmp_path / f"bad-{len(change)}-{next(iter(change.values()))}"
        bad.mkdir()
        (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
        (bad / ADAPTER_WEIGHTS).write_bytes((folder / ADAPTER_WEIGHTS).read_bytes())
        with pytest.raises(ConfigError, match=message):
            tinyvlm.load_vlm(base, adapter=bad)

    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    key = "base_model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    for name, edit, message in [
        ("extra", lambda t: {**t, "base_model.model.decoder.norm.weight": torch.ones(3)}, "unexpected in the adapter"),
        ("missing", lambda t: {k: v for k, v in t.items() if k != key}, "missing from the adapter"),
        ("shape", lambda t: {**t, key: torch.zeros(2, t[key].shape[1])}, "shape mismatches"),
    ]:
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        (bad / ADAPTER_CONFIG).write_text((folder / ADAPTER_CONFIG).read_text())
        save_file(edit(tensors), str(bad / ADAPTER_WEIGHTS))
        with pytest.raises(WeightsError, match=message):
            tinyvlm.load_vlm(base, adapter=bad)

    # a recipe base needs the adapter's trained projector: this adapter (projector saved) may use one, ...
    with pytest.raises(ConfigError, match="does not hold a trained projector"):
        no_projector = adapted(base, LoraSettings(rank=2))
        no_projector.peft_config["default"].modules_to_save = None
        tinyvlm.load_vlm("test-vlm", adapter=save_adapter(no_projector, tmp_path / "no-projector"))
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        add_lora(ours, LoraSettings(rank=2))
    with pytest.raises(ConfigError, match="either trained in full or adapted"):
        add_lora(tinyvlm.load_vlm(base), LoraSettings(rank=2), full_parts=("decoder",))

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r'pip install "tinyvlm\[lora\]"'):
        add_lora(tinyvlm.load_vlm(base), LoraSettings(rank=2))
