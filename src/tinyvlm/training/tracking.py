"""Experiment trackers (``--report-to``): every line a run writes to ``metrics.jsonl`` also goes to TensorBoard,
Weights & Biases or Trackio, as flat scalars (``loss``, ``grad_norm``, ``tokens_per_s``, ``lr/<group>``,
``skipped/<kind>``, ``val_loss``, ``val_accuracy``, ...) at the line's step. Each library is an optional extra,
imported only when asked for; rank 0 alone logs.

* ``tensorboard``: event files in ``OUTPUT/tensorboard`` (``tensorboard --logdir OUTPUT``); a resumed run
  purges the events after the step it resumes from, so that the curves have no doubled tail.
* ``wandb``: a run of ``--project`` named after the output folder, its files in ``OUTPUT/wandb``; the
  usual variables apply (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ...). A resumed run is a new wandb run.
* ``trackio``: a run of ``--project`` named after the output folder, in Trackio's local database
  (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show`` opens the dashboard).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from tinyvlm.errors import ConfigError

#: Tracker name -> (the module it needs, the extra that installs it).
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "trackio": ("trackio", "trackio")}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require(name: str) -> Any:
    """Import the library of tracker ``name``, or say which extra installs it."""
    module, extra = TRACKER_MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--report-to {name} needs {module}: pip install \"tinyvlm[{extra}]\"") from None


def scalars_of(values: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` line as flat scalars: nested dicts become ``outer/inner``; the step, the epoch's
    None and the wall-clock time are left out."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if key in ("step", "time") or value is None:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}/{inner}": float(v) for inner, v in value.items()})
        else:
            flat[key] = float(value)
    return flat


class TensorBoard:
    def __init__(self, output: Path, resumed_step: int):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output: Path, project: str, config: dict[str, Any]):
        wandb = require("wandb")
        self.run = wandb.init(project=project, name=output.name, dir=str(output), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, output: Path, project: str, config: dict[str, Any]):
        self.trackio = require("trackio")
        self.trackio.init(project=project, name=output.name, config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def check_installed(names: list[str]) -> None:
    """Fail at the start of a run, not at its first log, when a tracker's library is missing."""
    for name in names:
        require(name)


def open_trackers(names: list[str], output: Path, project: str, config: dict[str, Any], *,
                  resumed_step: int) -> list[Tracker]:
    """The trackers ``names``, started."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoard(output, resumed_step))
        elif name == "wandb":
            trackers.append(WandB(output, project, config))
        else:
            trackers.append(Trackio(output, project, config))
    return trackers
