"""Evaluation: `evaluate` (``tinyvlm eval``) scores a VLM on benchmarks as lmms-eval 0.7.3 scores them.

* `tinyvlm.evaluation.metrics`: one answer's score (MMStar's letter extraction, VQAv2 soft accuracy with its
  answer normalisation, ChartQA relaxed accuracy); torch-free;
* `tinyvlm.evaluation.tasks`: the tasks (`TASKS`): rows (read by `tinyvlm.data`'s sources) -> prompts, scores
  -> metrics;
* `tinyvlm.evaluation.runner`: `evaluate`, batched greedy generation and the results JSON;
* `tinyvlm.evaluation.lmms_plugin`: tinyvlm as an lmms-eval model (``lmms-eval --model tinyvlm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.lazy import lazy_attributes

_LAZY = {"evaluate": "tinyvlm.evaluation.runner", "TASKS": "tinyvlm.evaluation.tasks"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.evaluation.runner import evaluate
    from tinyvlm.evaluation.tasks import TASKS
