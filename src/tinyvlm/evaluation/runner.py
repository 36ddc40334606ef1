"""`evaluate`: answer a task's questions with a VLM, in batches and in the data's order, and score them.

Generation is greedy (lmms-eval's default for these tasks: no sampling), batched ``batch_size`` questions
at a time in the order the dataset stores them, so a run is deterministic and any sample's answer can be
found again. Each answer ends at the model's end-of-turn token or before the task's first stop string
(lmms-eval's ``until``), is stripped, then scored (`tinyvlm.evaluation.tasks`). Results are one JSON object; ``output`` writes it atomically (a temporary file in the
same folder, renamed into place).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

from tinyvlm import __version__
from tinyvlm.api import build_vlm, load_vlm
from tinyvlm.devices import check_device, default_device
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.evaluation.tasks import Sample, Task, parse_tasks
from tinyvlm.inference.threads import fixed_threads
from tinyvlm.sources import resolve
from tinyvlm.vlm.model import VLM


def evaluate(
    model: Any,
    tasks: str | Sequence[str],
    *,
    data: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output: str | Path | None = None,
    log_samples: bool = False,
    progress: bool = True,
    device: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``tasks`` and return the results (and write them to ``output`` as JSON).

    ``model``: a loaded `tinyvlm.VLM` (used as it is), or what ``tinyvlm generate --model`` takes (a saved
    folder, ``local-dir:``, ``hf-hub:`` or a zoo key; opened on ``device`` and prepared for inference).
    ``tasks``: names (``"mmstar,chartqa"`` or a list; see `tinyvlm.evaluation.TASKS`). ``data`` / ``split``
    replace the task's own source and split (one task only), any source training reads (a parquet file or
    folder, a save_to_disk folder, ``hf-dataset:ORG/NAME``; for ``exact_match`` also a JSONL / JSON file of
    records). ``limit``: the
    first N samples of each task. ``max_new_tokens`` replaces the tasks' own limits. ``log_samples`` adds
    every sample's prompt, answer, reference and score. ``progress``: a progress line on stderr.
    ``quantize`` (``"int8"`` / ``"int4"``, a model given by name) quantizes its decoder as it is read;
    ``threads``: intra-op CPU threads (default: automatic, `tinyvlm.inference.threads`).
    """
    chosen = parse_tasks(tasks)
    if (data is not None or split is not None) and len(chosen) > 1:
        raise ConfigError("--data / --split replace one task's data: evaluate one task at a time with them")
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    with fixed_threads(threads):  # the run's count, restored after it
        vlm, model_name = _open(model, device, quantize)
        results: dict[str, Any] = {
            "model": model_name,
            "tinyvlm": _version(),
            "settings": {"batch_size": batch_size, "limit": limit, "max_new_tokens": max_new_tokens,
                         "device": str(vlm.device), "threads": _threads(),
                         "quantize": None if vlm.config.quantization is None else vlm.config.quantization.mode},
            "tasks": {},
        }
        for task in chosen:
            results["tasks"][task.name] = run_task(
                vlm, task, data=data, split=split, limit=limit, batch_size=batch_size,
                max_new_tokens=max_new_tokens, log_samples=log_samples, progress=progress,
            )
    if output is not None:
        write_json(Path(output), results)
    return results


def run_task(
    vlm: Any, task: Task, *, data: str | None, split: str | None, limit: int | None, batch_size: int,
    max_new_tokens: int | None, log_samples: bool, progress: bool,
) -> dict[str, Any]:
    """One task's results: the headline ``metric`` and ``score``, all ``metrics``, per-group means and
    counts, timing, and (``log_samples``) the samples."""
    chosen = task.samples(data, split)
    samples, total = chosen.items, chosen.length
    if limit is not None:
        samples = islice(samples, limit)
        total = limit if total is None else min(total, limit)
    limit_tokens = max_new_tokens or task.max_new_tokens
    bar = ProgressLine(task.name, total, enabled=progress)
    scored: list[tuple[Sample, float]] = []
    logged: list[dict[str, Any]] = []
    began = time.perf_counter()
    for batch in _batches(samples, batch_size):
        generated = vlm.generate(
            [sample.messages for sample in batch], images=[sample.images for sample in batch],
            max_new_tokens=limit_tokens, stop=list(task.until),
        )
        for sample, text in zip(batch, generated):
            answer = task.answer(text)
            score = task.score(answer, sample.reference)
            scored.append((sample, score))
            if log_samples:
                logged.append({"id": sample.id, "prompt": sample.prompt, "generated": text, "answer": answer,
                               "reference": sample.reference, "score": score, **sample.groups})
        bar.update(len(scored))
    seconds = time.perf_counter() - began
    bar.close()
    if not scored:
        raise DataError(f"task {task.name}: the data holds no samples")
    metrics = task.aggregate(scored)
    result: dict[str, Any] = {
        "metric": task.metric,
        "score": metrics[task.metric],
        "metrics": metrics,
        "groups": _groups(scored),
        "samples": len(scored),
        "data": chosen.name,
        "prompt": {"post_prompt": task.post_prompt, "max_new_tokens": limit_tokens, "until": list(task.until)},
        "seconds": round(seconds, 3),
        "seconds_per_100_samples": round(100 * seconds / len(scored), 3),
    }
    if log_samples:
        result["log"] = logged
    return result


def _groups(scored: Sequence[tuple[Sample, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{group kind: {group: {"score": mean, "samples": count}}}`` (category, l2_category, answer_type...)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for sample, score in scored:
        for kind, group in sample.groups.items():
            sums.setdefault(kind, {}).setdefault(group, []).append(score)
    return {
        kind: {group: {"score": sum(values) / len(values), "samples": len(values)} for group, values in sorted(groups.items())}
        for kind, groups in sums.items()
    }


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(islice(samples, size)):
        yield batch


def _open(model: Any, device: str | None, quantize: str | None) -> tuple[VLM, str]:
    """The VLM to evaluate and the name the results give it: a name is resolved once and goes through the door
    it means (`load_vlm` for trained files, `build_vlm` for a recipe)."""
    if isinstance(model, (str, Path)):
        source = resolve(str(model), "vlm")
        options: dict[str, Any] = dict(device=check_device(device) or default_device(), quantize=quantize)
        vlm = load_vlm(source, **options) if source.has_files else build_vlm(source, **options)
        return vlm, str(model)
    if device is not None:
        raise ConfigError("device applies to a model given by name; move a loaded VLM with .to(device) first")
    if quantize is not None:
        raise ConfigError("quantize applies to a model given by name; quantize a loaded VLM with "
                          "tinyvlm.inference.quantize.quantize_model(vlm, mode) first")
    if not isinstance(model, VLM):
        raise ConfigError(f"model must be a tinyvlm.VLM or a model name, got {type(model).__name__}")
    return model, f"{type(model).__name__}({model.config.encoder} + {model.config.decoder})"


def _version() -> str:
    return __version__


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` atomically: a temporary file next to it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(results, indent=1, allow_nan=False, default=str) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class ProgressLine:
    """``mmstar 120/1500 [=====>     ] 3.2 samples/s ETA 7:10`` on stderr: rewritten in place on a terminal,
    else a line at every tenth of the way."""

    def __init__(self, name: str, total: int | None, *, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self.tty = sys.stderr.isatty()
        self.began = time.perf_counter()
        self.shown_tenths = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        rate = done / max(time.perf_counter() - self.began, 1e-9)
        if self.total:
            tenths = math.floor(10 * done / self.total)
            if not self.tty and tenths == self.shown_tenths:
                return
            self.shown_tenths = tenths
            filled = min(24, 24 * done // self.total)
            eta = (self.total - done) / max(rate, 1e-9)
            line = (f"{self.name} {done}/{self.total} [{'=' * filled}{'>' if filled < 24 else ''}"
                    f"{' ' * max(0, 23 - filled)}] {rate:.2f} samples/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        else:
            line = f"{self.name} {done} samples, {rate:.2f} samples/s"
        sys.stderr.write("\r" + line + "\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
