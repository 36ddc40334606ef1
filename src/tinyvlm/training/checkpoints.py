"""Training checkpoints: ``checkpoints/step-NNNNNNNN`` folders with the model, the optimizer state, the RNG
states and the step, written to a temporary folder and renamed into place (an interrupted save leaves the
previous checkpoint intact). A LoRA run's checkpoints hold its adapter (peft's files: LoRA weights and the
parts trained in full) instead of the model: the frozen base is rebuilt from its name on resume. The files are
the same whatever the strategy: a sharded (FSDP) run gathers the full states to rank 0, which writes them
(`tinyvlm.training.strategies`)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor, nn

from tinyvlm.errors import ConfigError
from tinyvlm.interop.lora import ADAPTER_WEIGHTS, has_adapter, load_adapter_weights, write_adapter_files
from tinyvlm.training.config import RESUMABLE_CHANGES, TrainConfig, saved_config

if TYPE_CHECKING:
    from tinyvlm.training.strategies import Replicated, Sharded

CHECKPOINTS = "checkpoints"
MODEL_WEIGHTS = "model.safetensors"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first (temporary folders of interrupted saves ignored)."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    tensors = {f"optimizer.{index}.{key}": value for index, entry in state["state"].items()
               for key, value in entry.items()}
    groups = [{k: v for k, v in group.items() if k != "params"} | {"params": group["params"]}
              for group in state["param_groups"]]
    return tensors, groups


def save_checkpoint(
    output: Path, step: int, vlm: nn.Module, optimizer_state: dict[str, Any], config: TrainConfig, keep: int,
    *, data_position: dict[str, Any], model_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (temporary folder, then rename); keep the last ``keep``.
    ``optimizer_state`` is in the layout of ``optimizer.state_dict()``; ``data_position`` is the data stream's
    position at the start of step ``step`` (JSON); ``model_tensors`` the full weights when ``vlm`` holds only
    shards of them (FSDP), else None: they are read from ``vlm``."""
    folder = output / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    temporary = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    if model_tensors is not None:
        save_file({k: v.contiguous() for k, v in model_tensors.items()}, str(temporary / MODEL_WEIGHTS),
                  metadata={"format": "pt"})
    elif has_adapter(vlm):
        write_adapter_files(vlm, temporary)
    else:
        save_model(vlm, str(temporary / MODEL_WEIGHTS))
    tensors, groups = _optimizer_tensors(optimizer_state)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary / "optimizer.safetensors"))
    state = {"step": step, "param_groups": groups, "python_rng": _jsonable(random.getstate()),
             "config": config.model_dump(mode="json"), "data": data_position}
    (temporary / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def check_resumable(folder: Path, config: TrainConfig) -> None:
    """Refuse to resume with options that change the trajectory (all but `RESUMABLE_CHANGES`; ``max_steps`` is
    checked by `check_extends` once it is resolved). A checkpoint written before the options had sections holds
    them flat, under the names that are aliases now: it is read as such (`saved_config`)."""
    saved, current = _compared(saved_config(json.loads((folder / "state.json").read_text())["config"])), _compared(config)
    changed = sorted(name for name in current.keys() | saved.keys()
                     if name not in RESUMABLE_CHANGES and saved.get(name) != current.get(name))
    if changed:
        diffs = ", ".join(f"{name}: {saved.get(name)!r} -> {current.get(name)!r}" for name in changed)
        raise ConfigError(
            f"cannot resume {folder}: options changed since it was written ({diffs}). Resume with the same "
            "options (a larger max_steps extends the run), or start a new run in another output_dir."
        )


def _compared(config: TrainConfig) -> dict[str, Any]:
    """The options as resuming compares them: ``val_fraction`` as the share it holds out (None is the default)."""
    return {**config.flat(), "val_fraction": config.evaluation.held_out_fraction}


def check_extends(folder: Path, max_steps: int) -> None:
    """A resumed run's ``max_steps`` may differ from the one it was started with (a larger one extends it), but
    not fall below the step of the checkpoint it resumes from."""
    step = json.loads((folder / "state.json").read_text())["step"]
    if max_steps < step:
        raise ConfigError(f"cannot resume {folder}: it is at step {step}, past max_steps {max_steps}. Give "
                          f"max_steps {step} or more (--max-steps) to continue it.")


def read_data_position(folder: Path) -> dict[str, Any]:
    """The data stream's position a checkpoint saved (`tinyvlm.data.stream.Mixture.state`)."""
    state = json.loads((folder / "state.json").read_text())
    if "data" not in state:
        raise ConfigError(f"{folder} has no data position (written by an older tinyvlm): start a new run")
    return state["data"]


def load_checkpoint(
    folder: Path, vlm: nn.Module, optimizer: torch.optim.Optimizer, strategy: "Replicated | Sharded",
) -> int:
    """Restore what `save_checkpoint` wrote (into shards, under FSDP); returns the step to continue from."""
    state = json.loads((folder / "state.json").read_text())
    if (folder / ADAPTER_WEIGHTS).is_file():
        load_adapter_weights(vlm, folder)
    else:
        strategy.load_model_file(vlm, folder / MODEL_WEIGHTS)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    strategy.load_optimizer_state(vlm, optimizer, optimizer_state)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(state["python_rng"]))
    return int(state["step"])
