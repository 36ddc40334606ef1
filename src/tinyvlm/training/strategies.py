"""How a run spreads the model over its processes (``strategy``), and activation checkpointing.

* `Replicated` (``ddp``, the default): every process holds the whole model, its gradients and its AdamW
  state; under ``torchrun`` the model is wrapped in DistributedDataParallel, which all-reduces gradients.
* `Sharded` (``fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) on each encoder block and each decoder
  block, then on the whole VLM (embeddings, projector, norms): every process keeps 1/N of every parameter,
  gradient and AdamW state, and a block's full weights exist only while it computes (all-gathered before its
  forward and its backward, freed after; gradients are reduce-scattered). The model is built on the CPU and
  moved to the GPU one block at a time as it is sharded, so the full fp32 model never sits on one GPU.

Both give the same losses (a test compares two FSDP processes with one process, within 1e-5) and write the
same checkpoint files: a sharded run gathers the full model and optimizer state to rank 0, which writes them
as a replicated run does (gathered, not sharded, checkpoints: the files of a one-process run, and a plain VLM
folder as the final ``model/``); on resume every process reads them and keeps its shards. Held-out evaluation under FSDP gathers the full weights on
every process for its duration (generation runs a different number of steps on each process, which
per-block all-gathers could not follow) and frees them after: the weights alone, a quarter of what DDP keeps
per process for training.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tinyvlm.errors import ConfigError
from tinyvlm.training.distributed import Processes


def blocks_of(vlm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the encoder and the decoder (``encoder.layers``, ``decoder.layers``): the
    units that FSDP shards and activation checkpointing recomputes."""
    blocks = []
    for part in ("encoder", "decoder"):
        layers = getattr(getattr(vlm, part), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"the {part} ({type(getattr(vlm, part)).__name__}) has no list of blocks in .layers: "
                              "activation checkpointing and fsdp need one")
        blocks += list(layers)
    return blocks


def checkpoint_activations(vlm: nn.Module) -> None:
    """Make every block recompute its activations in the backward pass (`torch.utils.checkpoint`, the
    non-reentrant form, which restores the RNG state so that dropout draws the same masks): the forward keeps
    only each block's inputs. The block stays the same module (same parameter names) with its ``forward``
    wrapped; FSDP's hooks, which run around ``forward``, still see each block."""
    for block in blocks_of(vlm):
        block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward: Callable[..., Tensor], *args: Any) -> Tensor:
    return checkpoint(forward, *args, use_reentrant=False)


class Replicated:
    """``ddp``: the whole model in every process; DistributedDataParallel when there are several."""

    name = "ddp"

    def __init__(self, processes: Processes):
        self.processes = processes

    @property
    def build_device(self) -> torch.device:
        return self.processes.device

    def wrap(self, vlm: nn.Module, *, compile: bool) -> nn.Module:
        model: nn.Module = torch.compile(vlm) if compile else vlm
        if self.processes.world_size > 1:
            device = self.processes.device
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    def gradient_sync(self, model: nn.Module, sync: bool) -> ContextManager[Any]:
        """Around one micro-batch's backward: all-reduce its gradients (the step's last micro-batch) or only
        accumulate them locally."""
        return contextlib.nullcontext() if sync or self.processes.world_size == 1 else model.no_sync()

    def full_weights(self, vlm: nn.Module) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def total_norm(self, norm: Tensor) -> float:
        return float(norm)

    def model_state(self, vlm: nn.Module) -> dict[str, Tensor] | None:
        """The full weights for a checkpoint, or None: the checkpoint reads them from ``vlm`` itself."""
        return None

    def optimizer_state(self, vlm: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_model_file(self, vlm: nn.Module, path: Path) -> None:
        from safetensors.torch import load_model

        load_model(vlm, str(path), strict=True)

    def load_optimizer_state(self, vlm: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


class Sharded:
    """``fsdp``: FSDP2 per encoder / decoder block, then the VLM. Collectives (``model_state``,
    ``optimizer_state``, ``full_weights``) must be entered by every process in the same order."""

    name = "fsdp"

    def __init__(self, processes: Processes):
        self.processes = processes

    @property
    def build_device(self) -> torch.device:
        return torch.device("cpu")  # fully_shard moves each block to the device as it shards it

    def wrap(self, vlm: nn.Module, *, compile: bool) -> nn.Module:
        """Shard ``vlm`` in place, then run one forward (of a filler sample, without gradients): FSDP2 takes
        the module of the first forward as its root, which must be the VLM (evaluation calls blocks alone)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from tinyvlm.data.loading import filler_batch

        device = self.processes.device
        mesh = init_device_mesh(device.type, (self.processes.world_size,))
        for block in blocks_of(vlm):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(vlm, mesh=mesh, reshard_after_forward=False)  # the root's weights are needed again at once
        batch = filler_batch(vlm.processor).to(device)
        with torch.no_grad():
            vlm(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
        vlm.reshard()  # the root keeps its gathered weights after a forward: the optimizer must see the shards
        return torch.compile(vlm) if compile else vlm

    def gradient_sync(self, model: nn.Module, sync: bool) -> ContextManager[Any]:
        self._root(model).set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self, vlm: nn.Module) -> Iterator[None]:
        """Every process holds the full weights inside the block (no collective runs until it ends)."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in vlm.modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.unshard()
        vlm.set_reshard_after_forward(False)
        try:
            yield
        finally:
            vlm.set_reshard_after_forward(True)
            vlm.set_reshard_after_forward(False, recurse=False)
            for module in modules:
                module.reshard()

    def total_norm(self, norm: Tensor) -> float:
        from torch.distributed.tensor import DTensor

        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def model_state(self, vlm: nn.Module) -> dict[str, Tensor] | None:
        """The full weights, gathered on rank 0 in CPU memory (an empty dict on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, vlm: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full AdamW state gathered on rank 0, in the layout of ``optimizer.state_dict()`` (parameters
        numbered in the order of the groups), the one a replicated run saves."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(vlm, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.processes.main:
            return {}
        index = {name: i for i, name in enumerate(_parameter_names(vlm, optimizer))}
        return {
            "state": {index[name]: values for name, values in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]],
        }

    def load_model_file(self, vlm: nn.Module, path: Path) -> None:
        """Load the full weights (every process reads the file) into this process's shards."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(vlm, load_file(str(path)), options=StateDictOptions(full_state_dict=True, strict=True))

    def load_optimizer_state(self, vlm: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _parameter_names(vlm, optimizer)
        keyed = {
            "state": {names[int(i)]: values for i, values in state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in state["param_groups"]],
        }
        set_optimizer_state_dict(vlm, optimizer, keyed, options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def _root(model: nn.Module) -> Any:
        return getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the FSDP module


def _parameter_names(vlm: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): name for name, p in vlm.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def make_strategy(name: str, processes: Processes) -> Replicated | Sharded:
    """The strategy called ``name`` (`TrainConfig.strategy`)."""
    return Sharded(processes) if name == "fsdp" else Replicated(processes)
