"""Training, in layers:

* `tinyvlm.training.config`: `TrainConfig`, every option validated, in sections (torch-free; the CLI's flags);
* `tinyvlm.training.loop`: `train` / `run`, the optimizer loop and held-out evaluation;
* `tinyvlm.training.checkpoints`: atomic checkpoints and exact resume;
* `tinyvlm.training.distributed`: the ``torchrun`` process group;
* `tinyvlm.training.strategies`: DDP or FSDP2 (``strategy``), activation checkpointing;
* `tinyvlm.training.progress`: the progress line and ``metrics.jsonl``;
* `tinyvlm.training.tracking`: ``report_to`` (TensorBoard, wandb, Trackio);
* `tinyvlm.training.plot`: ``metrics.png``, the curves of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.lazy import lazy_attributes

_LAZY = {
    "train": "tinyvlm.training.loop",
    "run": "tinyvlm.training.loop",
    "TrainResult": "tinyvlm.training.loop",
    "TrainConfig": "tinyvlm.training.config",
    "make_config": "tinyvlm.training.config",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.training.config import TrainConfig, make_config
    from tinyvlm.training.loop import TrainResult, run, train
