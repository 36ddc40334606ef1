"""Strict safetensors loading into modules built on the meta device.

The checkpoint is checked against the module before any tensor is read: every key of the file is either
mapped onto a module tensor by the family's `KeyMap` or declared unused by it, every module tensor is
covered, and every shape matches; otherwise a `WeightsError` lists all the problems at once. Tensors are
then read one at a time, cast, moved to the device and assigned in place of the meta tensors. safetensors
memory-maps the file, so a CPU load without a cast assigns views of the mapping (paged in on first use,
copy-on-write if modified): one copy of the weights in all. A cast adds the converted copies while the mapped
pages stay resident until the file is closed (see ``benchmarks/load_memory.py``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tinyvlm.errors import WeightsError


@dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's tensor names map onto a module's state dict.

    ``rename``: ``(pattern, replacement)`` pairs; the first pattern that fully matches a checkpoint key gives
    the module key (``re`` replacement syntax, e.g. ``(r"model\\.layers\\.(\\d+)\\.(.*)", r"blocks.\\1.\\2")``).
    ``unused``: patterns of checkpoint keys deliberately not loaded (the SigLIP text tower, say).
    ``split``: ``(pattern, replacements)`` pairs for a fused tensor that the module keeps as several:
    it is cut along dim 0 into ``len(replacements)`` equal chunks (nanoVLM's stacked q, k, v).
    ``squeeze``: patterns of checkpoint keys stored with a leading dimension of size 1 that the module's
    tensor does not have (nanoVLM's ``[1, N, D]`` position table for an ``[N, D]`` embedding).
    ``copies``: ``(pattern, replacement)`` pairs for keys that hold a second copy of a tied tensor (an LM head
    tied to the embedding): read only when the file has no other key for that tensor, skipped otherwise.
    """

    rename: tuple[tuple[str, str], ...]
    unused: tuple[str, ...] = ()
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()
    squeeze: tuple[str, ...] = ()
    copies: tuple[tuple[str, str], ...] = ()

    def squeezes(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.squeeze)

    def targets(self, key: str) -> tuple[str, ...] | None:
        """The module keys a checkpoint key fills; ``None`` if declared unused, ``()`` if not mapped at all."""
        if any(re.fullmatch(pattern, key) for pattern in self.unused):
            return None
        for pattern, replacements in self.split:
            if re.fullmatch(pattern, key):
                return tuple(re.sub(pattern, r, key) for r in replacements)
        for pattern, replacement in self.rename:
            if re.fullmatch(pattern, key):
                return (re.sub(pattern, replacement, key),)
        return ()

    def copy_target(self, key: str) -> str | None:
        """The tied module key a `copies` key would fill, or None."""
        for pattern, replacement in self.copies:
            if re.fullmatch(pattern, key):
                return re.sub(pattern, replacement, key)
        return None


class TensorFiller(Protocol):
    """Takes over the loading of some of a module's tensors (`tinyvlm.inference.quantize.LoadQuantizer`): `claims`
    says which (by module tensor name); `fill` reads one from its rows in the file and puts it in place."""

    def claims(self, target: str) -> bool: ...

    def fill(self, target: str, rows: "FileRows", device: torch.device) -> None: ...


def load_checkpoint(
    module: nn.Module,
    files: list[Path],
    key_map: KeyMap,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    filler: TensorFiller | None = None,
) -> nn.Module:
    """Fill ``module`` (built on the meta device) from safetensors ``files`` through ``key_map``.

    ``dtype=None`` keeps each tensor's stored dtype. Floating tensors are cast before they are moved, except
    in modules with ``keeps_stored_dtype`` (quantized ones: their scales keep the dtype the kernels read);
    those modules' tensors are read into memory of their own (`read_tensor`), never left as views of the
    memory-mapped file: the quantized kernels need aligned memory (a view at an arbitrary file offset
    crashes them).
    ``filler`` loads the tensors it claims itself (quantizing them as they are read), after the whole
    checkpoint has been checked against the module as usual.
    """
    device = torch.device(device or "cpu")
    expected, aliases = _module_tensors(module)
    plan, problems = _plan(files, key_map, expected, aliases)
    if problems:
        raise WeightsError(f"checkpoint {_describe_files(files)} does not fit {type(module).__name__}:\n" + problems)

    for path, keys in plan.items():
        with open_safetensors(path) as handle:
            for key, targets in keys:
                if filler is not None and not key_map.squeezes(key) and all(filler.claims(t) for t in targets):
                    for part, target in enumerate(targets):
                        filler.fill(target, FileRows(path, key, part=part, parts=len(targets)), device)
                    continue
                owned = any(_keeps_stored_dtype(module, t) for t in targets)
                tensor = read_tensor(path, key) if owned else handle.get_tensor(key)
                if key_map.squeezes(key):
                    tensor = tensor.squeeze(0)
                for target, chunk in zip(targets, tensor.chunk(len(targets)) if len(targets) > 1 else [tensor]):
                    if dtype is not None and chunk.is_floating_point() and not _keeps_stored_dtype(module, target):
                        chunk = chunk.to(dtype)
                    _assign(module, aliases[target], chunk.to(device).contiguous())
                del tensor
    materialize_buffers(module, device)
    return module


def _keeps_stored_dtype(module: nn.Module, target: str) -> bool:
    owner = module.get_submodule(target.rpartition(".")[0])
    return getattr(owner, "keeps_stored_dtype", False)


#: safetensors dtype names.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _pread_into(path: Path, key: str, out: torch.Tensor, offset: int) -> torch.Tensor:
    """Fill the (contiguous) ``out`` with its size in bytes of ``path`` from ``offset``."""
    view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
    with open(path, "rb", buffering=0) as handle:
        while done < len(view):
            read = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if read <= 0:
                raise WeightsError(f"{path} ends inside {key} (truncated?); download it or save it again")
            done += read
    return out


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read (``os.preadv``) into a new, aligned CPU tensor."""
    header, data_start = read_header(path)
    entry = header[key]
    out = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    return _pread_into(path, key, out, data_start + entry["data_offsets"][0]) if out.numel() else out


class FileRows:
    """The rows of one 2-D floating-point tensor of a safetensors file, read in blocks with plain reads
    (``os.preadv``): a memory map would keep every page it touched resident until the file is closed, so a
    matrix converted block by block (quantized) would still cost its full size. The file's header gives the
    dtype, shape and byte range; rows are contiguous. ``part`` of ``parts``: one of the equal row ranges a
    key map splits a tensor into."""

    def __init__(self, path: Path, key: str, *, part: int = 0, parts: int = 1) -> None:
        header, data_start = read_header(path)
        entry = header[key]
        if entry["dtype"] not in ("F64", "F32", "F16", "BF16") or len(entry["shape"]) != 2:
            raise WeightsError(f"{path}: {key} is {entry['dtype']} {entry['shape']}, not a floating-point matrix")
        self.path, self.key = path, key
        self.dtype = DTYPES[entry["dtype"]]
        rows, self.cols = entry["shape"]
        self.rows = rows // parts
        self.row_bytes = self.cols * torch.finfo(self.dtype).bits // 8
        self.offset = data_start + entry["data_offsets"][0] + part * self.rows * self.row_bytes

    def blocks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows [n, cols])`` for blocks of ``size`` rows, in the file's dtype."""
        for start in range(0, self.rows, size):
            block = torch.empty(min(size, self.rows - start), self.cols, dtype=self.dtype)
            yield start, _pread_into(self.path, self.key, block, self.offset + start * self.row_bytes)
            del block  # before the next one is allocated


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    stat = os.stat(path)
    try:
        return _read_header(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError, struct.error) as error:
        raise WeightsError(f"{path} is not a readable safetensors file ({error}); download or save it again") from None


@functools.lru_cache(maxsize=16)
def _read_header(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open` whose failures (a truncated download, a file that is not safetensors) are `WeightsError`s."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt. "
            "Delete it and download it again (tinyvlm download NAME), or save the model again."
        ) from None
    with handle:
        yield handle


def materialize_buffers(module: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (RoPE tables, ...) that were left on the meta device.

    A module that owns such buffers (the root included) defines ``materialize_buffers(device)``; they are
    never in checkpoints.
    """
    for sub in module.modules():
        if hasattr(sub, "materialize_buffers"):
            sub.materialize_buffers(device)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{type(module).__name__} still has uninitialised tensors after loading: {_list(left)}")


def _module_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Persistent tensors by name, and for each one the names that share it (tied weights)."""
    by_identity: dict[int, list[str]] = defaultdict(list)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_identity[id(tensor)].append(name)
        tensors.setdefault(name, tensor)
    aliases = {}
    for names in by_identity.values():
        for name in names:
            aliases[name] = names
    return tensors, aliases


def _plan(
    files: list[Path], key_map: KeyMap, expected: dict[str, torch.Tensor], aliases: dict[str, list[str]]
) -> tuple[dict[Path, list[tuple[str, tuple[str, ...]]]], str]:
    plan: dict[Path, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    covered: dict[str, str] = {}
    unexpected, mismatched, duplicated = [], [], []
    copies: list[tuple[Path, str, str]] = []
    for path in files:
        with open_safetensors(path) as handle:
            for key in handle.keys():
                copy_of = key_map.copy_target(key)
                if copy_of is not None:
                    copies.append((path, key, copy_of))
                    continue
                targets = key_map.targets(key)
                if targets is None:
                    continue
                unknown = [t for t in targets if t not in expected]
                if not targets or unknown:
                    unexpected.append(key)
                    continue
                shape = list(handle.get_slice(key).get_shape())
                if key_map.squeezes(key) and shape[:1] == [1]:
                    shape = shape[1:]
                if len(targets) > 1:
                    if not shape or shape[0] % len(targets):
                        mismatched.append(f"{key}: checkpoint {shape} does not split into {len(targets)} equal parts")
                        continue
                    shape[0] //= len(targets)
                for target in targets:
                    want = list(expected[target].shape)
                    if shape != want:
                        mismatched.append(f"{key}: checkpoint {shape}, model {want} ({target})")
                    group = aliases[target]  # one tensor, several names when weights are tied
                    if group[0] in covered:
                        duplicated.append(f"{' = '.join(group)} (from {covered[group[0]]} and {key})")
                    for name in group:
                        covered[name] = key
                plan[path].append((key, targets))
    for path, key, target in copies:  # a second copy of a tied tensor fills it only when nothing else does
        if target in expected and target not in covered:
            for name in aliases[target]:
                covered[name] = key
            plan[path].append((key, (target,)))
    missing = [name for name in expected if name not in covered]
    sections = [
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint (neither mapped nor declared unused)", unexpected),
        ("shape mismatches", mismatched),
        ("filled twice", duplicated),
    ]
    problems = "\n".join(f"  {title} ({len(items)}): {_list(items)}" for title, items in sections if items)
    return plan, problems


def _assign(module: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Put ``value`` in place of the meta tensor known by ``names`` (several when weights are tied)."""
    shared: torch.Tensor | None = None
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            if shared is None:
                shared = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
            owner._parameters[leaf] = shared
        else:
            owner._buffers[leaf] = value


def _describe_files(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"


def _list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
