"""Devices and dtypes named by users, checked before anything is built."""

from __future__ import annotations

import torch

from tinyvlm.errors import ConfigError

#: ``--dtype`` names.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a `torch.device`, refused with a `ConfigError` when this torch cannot use it (a CUDA
    device on a CPU-only build, a GPU index that does not exist); None stays None (the caller's default)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device {device!r} is not a device name ({error}); use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build that sees no GPU"
            raise ConfigError(
                f"device {str(device)!r}: this torch ({torch.__version__}) is {build}. Use --device cpu, or install "
                "a CUDA build of torch on a machine with a GPU (https://pytorch.org/get-started/locally/)."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r}: MPS is not available in this torch on this machine; use cpu")
    return parsed


def default_device() -> torch.device:
    """CUDA when this torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A floating dtype from its name (``bf16``, ``float32``, ...) or itself; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and not name.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point dtype (torch.float32 / bfloat16), got {name}")
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
