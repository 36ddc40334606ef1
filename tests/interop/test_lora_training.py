"""LoRA runs of `tinyvlm.train` / ``tinyvlm train --lora``: only the adapter and the projector train, the run
saves the adapter alone, a killed run resumes to bit-identical adapter weights, and bad options are errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinyvlm
from tinyvlm.evaluation.shapes import make_shapes_dataset
from tinyvlm.errors import ConfigError
from tinyvlm.interop.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_layers
from tinyvlm.training.config import make_config

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=40, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved test-vlm: LoRA adapts a base that load_vlm rebuilds (random-init recipes cannot be)."""
    torch.manual_seed(0)
    vlm = tinyvlm.build_vlm("test-vlm", dtype=torch.float32)
    with torch.no_grad():
        for weight in vlm.decoder.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape) * 0.2)  # the same values in any weight layout
    return vlm.save_pretrained(tmp_path_factory.mktemp("base") / "model")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyvlm.cli", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_lora_run_trains_the_adapter_and_the_projector_only(data: Path, base: Path, tmp_path: Path) -> None:
    result = tinyvlm.train(model=str(base), data=data, output=tmp_path / "run", lora=4, lora_alpha=8,
                           lora_targets="q,v,down", max_steps=3, batch_size=4, grad_accum=1, lr=1e-2,
                           checkpoint_every=0, eval_samples=2, progress=False)
    assert result.model_dir is None and result.adapter_dir == tmp_path / "run" / "adapter"
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert not (tmp_path / "run" / "model").exists()
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["modules_to_save"] == ["projector"]
    assert config["base_model_name_or_path"] == str(base.resolve())

    tensors = load_file(str(result.adapter_dir / ADAPTER_WEIGHTS))
    lora_b = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert len(lora_b) == 3 * 2 and all(v.abs().max() > 0 for v in lora_b)  # q, v, down x 2 layers, trained
    assert {k.split(".")[2] for k in tensors} == {"decoder", "projector"}
    original = tinyvlm.load_vlm(base)
    trained = tinyvlm.load_vlm(base, adapter=result.adapter_dir)
    assert set(lora_layers(trained)) == {f"decoder.layers.{i}.{m}" for i in range(2)
                                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    base_weights = {n: p for n, p in original.named_parameters()}
    for name, param in trained.named_parameters():
        plain = name.replace(".base_layer", "")
        if name.startswith("projector."):
            assert not torch.equal(param, base_weights[plain]), name  # trained in full
        elif ".lora_" not in name:
            assert torch.equal(param, base_weights[plain]), name  # frozen
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(log[0]["lr"]) == {"projector", "decoder.lora"}  # the bias-free Linear has no vectors to exempt


def test_killed_lora_run_resumes_to_the_same_adapter(data: Path, base: Path, tmp_path: Path) -> None:
    common = ["train", "--model", str(base), "--data", str(data), "--lora", "4", "--lora-parts", "decoder,encoder",
              "--lora-dropout", "0.1", "--max-steps", "8", "--batch-size", "2", "--grad-accum", "2",
              "--checkpoint-every", "2", "--log-every", "1", "--eval-samples", "0", "--no-progress", "--lr", "5e-3"]
    straight = tmp_path / "straight"
    subprocess.run(cli(*common, "--output", str(straight)), check=True, env=run_env(), timeout=180)

    killed = tmp_path / "killed"
    process = subprocess.Popen(cli(*common, "--output", str(killed)), env=run_env())
    deadline = time.monotonic() + 180
    while not (killed / "checkpoints" / "step-00000004").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter").exists()  # really killed mid-way
    checkpoint = killed / "checkpoints" / "step-00000004"
    assert (checkpoint / ADAPTER_WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()
    held = load_file(str(checkpoint / ADAPTER_WEIGHTS))  # the adapter and the projector, not the frozen base
    assert {k.split(".")[2] for k in held} == {"encoder", "decoder", "projector"}
    assert all(".lora_" in k or k.startswith("base_model.model.projector.") for k in held)

    changed = subprocess.run(cli(*common, "--output", str(killed), "--resume", "--lora", "8"), env=run_env(),
                             capture_output=True, text=True)
    assert changed.returncode == 1 and "options changed" in changed.stderr and "lora_rank: 4 -> 8" in changed.stderr
    subprocess.run(cli(*common, "--output", str(killed), "--resume"), check=True, env=run_env(), timeout=180)
    expected = load_file(str(straight / "adapter" / ADAPTER_WEIGHTS))
    resumed = load_file(str(killed / "adapter" / ADAPTER_WEIGHTS))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name

    def losses(run: Path) -> list[float]:
        return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]

    assert losses(killed) == losses(straight) and len(losses(straight)) == 8
    assert losses(straight)[0] != losses(straight)[-1]


def test_lora_options_are_validated(data: Path, base: Path, tmp_path: Path) -> None:
    options = dict(data=data, output=tmp_path / "run", model=str(base))
    for extra, message in [
        (dict(lora_alpha=16), "lora_alpha set, but LoRA is off"),
        (dict(lora=4, train="decoder"), "both in train"),
        (dict(lora=4, lora_targets="q,attn"), "lora_targets='q,attn'"),
        (dict(lora=4, lora_parts="projector"), "lora_parts='projector'"),
        (dict(train="none"), "leaves nothing to train"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_config(**options, **extra)
    with pytest.raises(ConfigError, match="lora needs model"):
        make_config(data=data, output=tmp_path / "run", encoder="test-siglip", decoder="test-llama", lora=4)
    assert make_config(**options, lora=4, train="none").trained_parts == ("decoder",)
    # test-vlm is a recipe of random-init parts: load_vlm could never rebuild the base of its adapter
    with pytest.raises(ConfigError, match="cannot be rebuilt: .*test-siglip.*random-init"):
        tinyvlm.train(data=data, output=tmp_path / "recipe", model="test-vlm", lora=4, progress=False, max_steps=1)
    usage = subprocess.run(cli("train", "--help"), capture_output=True, text=True, env=run_env()).stdout
    for flag in ("--lora N", "--lora-alpha N", "--lora-targets", "--lora-parts", "--lora-dropout X", "--lora-rslora"):
        assert flag in usage, flag
