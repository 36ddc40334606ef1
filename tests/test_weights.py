"""The strict safetensors loader (tinyvlm.weights), on the test-only tiny family and small ad-hoc modules."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from tiny_family import TinyConfig, TinyModule, checkpoint_tensors, key_map, write_checkpoint
from torch import nn

from tinyvlm.errors import WeightsError
from tinyvlm.sources import resolve
from tinyvlm.weights import KeyMap, load_checkpoint


def _meta_tiny(config: TinyConfig = TinyConfig()) -> TinyModule:
    with torch.device("meta"):
        return TinyModule(config)


def _load(tmp_path, tensors: dict, module: nn.Module | None = None, keys: KeyMap | None = None, **options):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return load_checkpoint(module or _meta_tiny(), [path], keys or key_map(TinyConfig()), **options)


def test_loads_every_tensor(tmp_path):
    tensors = checkpoint_tensors(TinyConfig())
    module = _load(tmp_path, tensors)
    for key in ("embed.weight", "fc.weight", "fc.bias", "out.weight"):
        assert torch.equal(module.get_parameter(key), tensors[f"model.{key}"])
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def test_tied_weights_stay_one_parameter(tmp_path):
    module = _load(tmp_path, checkpoint_tensors(TinyConfig()))
    assert module.head.weight is module.embed.weight
    assert len(list(module.parameters())) == 4  # embed (= head), fc.weight, fc.bias, out.weight
    ids = torch.tensor([[1, 2, 3]])
    expected = torch.relu(module.fc(module.embed(ids)))
    expected = module.out(expected) @ module.embed.weight.T
    torch.testing.assert_close(module(ids), expected)


def test_tied_copy_in_checkpoint_is_filled_twice(tmp_path):
    tensors = checkpoint_tensors(TinyConfig())
    tensors["model.head.weight"] = tensors["model.embed.weight"].clone()
    with pytest.raises(WeightsError, match=r"filled twice \(1\): embed.weight = head.weight \(from model.embed.weight and model.head.weight\)"):
        _load(tmp_path, tensors)


def test_all_problems_in_one_error(tmp_path):
    tensors = checkpoint_tensors(TinyConfig())
    del tensors["model.fc.bias"], tensors["model.out.weight"]  # missing
    tensors["model.fc.weight"] = torch.zeros(3, 3)  # mis-shaped
    tensors["model.extra.weight"] = torch.zeros(2)  # maps to nothing in the module
    tensors["vision.stray"] = torch.zeros(2)  # maps nowhere
    with pytest.raises(WeightsError) as error:
        _load(tmp_path, tensors)
    message = str(error.value)
    assert re.search(r"missing from the checkpoint \(2\): fc.bias, out.weight", message)
    assert re.search(r"unexpected in the checkpoint .* \(2\): model.extra.weight, vision.stray", message)
    assert re.search(r"shape mismatches \(1\): model.fc.weight: checkpoint \[3, 3\], model \[16, 8\] \(fc.weight\)", message)


def test_declared_unused_keys_are_skipped(tmp_path):
    tensors = checkpoint_tensors(TinyConfig())
    assert "text_tower.proj.weight" in tensors
    _load(tmp_path, tensors)
    strict = KeyMap(rename=((r"model\.(.*)", r"\1"),))  # the same map without the declaration
    with pytest.raises(WeightsError, match=r"unexpected .*text_tower.proj.weight"):
        _load(tmp_path, tensors, keys=strict)


class QKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


def test_split_rule_cuts_fused_tensors(tmp_path):
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 4), torch.randn(12)
    keys = KeyMap(rename=(), split=((r"qkv\.(weight|bias)", (r"q.\1", r"k.\1", r"v.\1")),))
    with torch.device("meta"):
        module = QKV()
    _load(tmp_path, {"qkv.weight": weight, "qkv.bias": bias}, module, keys)
    for i, name in enumerate("qkv"):
        assert torch.equal(getattr(module, name).weight, weight[4 * i : 4 * (i + 1)])
        assert torch.equal(getattr(module, name).bias, bias[4 * i : 4 * (i + 1)])
    with torch.device("meta"):
        module = QKV()
    with pytest.raises(WeightsError, match=r"qkv.weight: checkpoint \[13, 4\] does not split into 3 equal parts"):
        _load(tmp_path, {"qkv.weight": torch.zeros(13, 4), "qkv.bias": bias}, module, keys)


def test_stored_bf16_cast_to_fp32_and_back(tmp_path):
    fp32 = checkpoint_tensors(TinyConfig())
    bf16 = {key: value.to(torch.bfloat16) for key, value in fp32.items()}
    kept = _load(tmp_path, bf16)
    assert kept.fc.weight.dtype == torch.bfloat16  # dtype=None keeps the stored dtype
    widened = _load(tmp_path, bf16, dtype=torch.float32)
    assert widened.fc.weight.dtype == torch.float32
    assert torch.equal(widened.fc.weight, bf16["model.fc.weight"].float())
    narrowed = _load(tmp_path, fp32, dtype=torch.bfloat16)
    assert narrowed.fc.weight.dtype == torch.bfloat16
    assert torch.equal(narrowed.fc.weight, fp32["model.fc.weight"].to(torch.bfloat16))
    assert narrowed.head.weight is narrowed.embed.weight
    assert narrowed.rotary.inv_freq.dtype == torch.float32  # computed buffers keep their own dtype


def test_cast_happens_before_the_move(tmp_path, monkeypatch):
    """Casting on the source device first means a bf16 load never puts fp32 copies on the target device."""
    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append((self.device.type, self.dtype, args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    _load(tmp_path, checkpoint_tensors(TinyConfig()), dtype=torch.bfloat16, device="cpu")
    casts = [i for i, (_, _, args, _) in enumerate(calls) if args and args[0] == torch.bfloat16]
    moves = [i for i, (_, dtype, args, _) in enumerate(calls) if args and isinstance(args[0], torch.device)]
    assert casts and moves
    assert all(calls[i][1] == torch.bfloat16 for i in moves)  # only already-cast tensors are moved


def test_non_persistent_buffers_are_materialised(tmp_path):
    module = _load(tmp_path, checkpoint_tensors(TinyConfig()))
    assert "rotary.inv_freq" not in module.state_dict()
    with torch.device("cpu"):
        reference = TinyModule(TinyConfig())
    assert torch.equal(module.rotary.inv_freq, reference.rotary.inv_freq)


def test_root_module_hook_is_called(tmp_path):
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

        def materialize_buffers(self, device: torch.device) -> None:
            self.table = torch.arange(3.0, device=device)

    with torch.device("meta"):
        module = Root()
    _load(tmp_path, {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, module, KeyMap(rename=((r"(.*)", r"\1"),)))
    assert torch.equal(module.table, torch.arange(3.0))


def test_buffer_left_on_meta_is_an_error(tmp_path):
    class Forgetful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)  # and no hook to rebuild it

    with torch.device("meta"):
        module = Forgetful()
    with pytest.raises(WeightsError, match=r"uninitialised tensors after loading: table"):
        _load(tmp_path, {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, module, KeyMap(rename=((r"(.*)", r"\1"),)))


def test_persistent_buffers_load(tmp_path):
    class WithStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))

    with torch.device("meta"):
        module = WithStats()
    _load(tmp_path, {"mean": torch.tensor([1.0, 2.0, 3.0])}, module, KeyMap(rename=((r"(.*)", r"\1"),)))
    assert torch.equal(module.mean, torch.tensor([1.0, 2.0, 3.0]))


def test_requires_grad_is_kept_and_weights_are_trainable(tmp_path):
    module = _load(tmp_path, checkpoint_tensors(TinyConfig()))
    assert all(p.requires_grad for p in module.parameters())
    before = module.fc.weight.detach().clone()
    module(torch.tensor([[1, 2]])).sum().backward()
    with torch.no_grad():
        for p in module.parameters():
            p -= 0.1 * p.grad
    assert not torch.equal(module.fc.weight, before)


def test_sharded_files(tmp_path):
    tensors = write_checkpoint(tmp_path, shards=3)
    (tmp_path / "config.json").write_text("{}")
    files = resolve(f"local-dir:{tmp_path}").weight_files()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    module = load_checkpoint(_meta_tiny(), files, key_map(TinyConfig()))
    assert torch.equal(module.out.weight, tensors["model.out.weight"])


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"neither model.safetensors .* It has pytorch_model.bin. tinyvlm loads safetensors only"):
        resolve(f"local-dir:{tmp_path}").weight_files()


def test_a_truncated_file_is_a_weights_error(tmp_path):
    write_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(WeightsError, match=r"model.safetensors is not a readable safetensors file .* truncated or corrupt"):
        load_checkpoint(_meta_tiny(), [path], key_map(TinyConfig()))
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_checkpoint(_meta_tiny(), [path], key_map(TinyConfig()))
