"""Intra-op threads: fixed around the work they are for (`fixed_threads`, behind every ``threads=``; the
command-line process fixes its own with `set_threads`), or chosen automatically, step by step, between all
threads and one (`ThreadTuner`). A model's generation steps run under its `ThreadChoice`, which
`tinyvlm.inference.prepare_for_inference` gives it. No library function changes the process's count for
good: a count is set for a block and restored after it.

Why automatic: a decoding step is a few hundred small products, and each product split over threads is an
OpenMP parallel region that waits for its slowest thread. When another process keeps a core busy, the
thread scheduled on that core gets a time slice only now and then, and every region waits for it: two threads
then decode several times slower than one (and train slower too). Which count wins depends on the load at
that moment, so `ThreadTuner` times the repeated step (a decoding step, a training step) at both counts,
keeps the faster and checks the other again from time to time. With ``threads`` given explicitly (or
``OMP_NUM_THREADS`` set, or inside a `fixed_threads` block) the count is fixed and nothing is tuned. The count only changes *during* a step
and is restored after it, so code running between steps never sees it.

Torch-free at import (torch is imported when a count is set).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from tinyvlm.errors import ConfigError

_pinned: int | None = None
#: How many `fixed_threads` blocks are open (a count is fixed while any is).
_fixed_blocks = 0


def check_threads(threads: object) -> int:
    """``threads`` as a count of intra-op threads (an integer >= 1), or a `ConfigError`."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1 (or None: automatic); got {threads!r}")
    return threads


def set_threads(threads: int | None) -> None:
    """For the command-line process only: use ``threads`` intra-op threads from now on, fixed (no tuning).
    None leaves the count as it is, tuned automatically. Library code uses `fixed_threads`."""
    global _pinned
    if threads is None:
        return
    import torch

    torch.set_num_threads(check_threads(threads))
    _pinned = threads


@contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Within the block, ``threads`` intra-op threads, fixed (no tuning); the count before is restored after
    it. None changes nothing."""
    global _fixed_blocks
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(check_threads(threads))
    _fixed_blocks += 1
    try:
        yield
    finally:
        _fixed_blocks -= 1
        torch.set_num_threads(before)


def pinned() -> bool:
    """Whether the thread count is fixed: ``OMP_NUM_THREADS``, the command line's ``--threads``
    (`set_threads`), or an open `fixed_threads` block."""
    return _pinned is not None or _fixed_blocks > 0 or bool(os.environ.get("OMP_NUM_THREADS"))


@dataclass
class StepSize:
    """The size of a timed step (`ThreadTuner.step` divides its time by it): tokens, or 1 for "a step". A step
    that learns its size only while it runs (a training step that loads its batches) sets ``units`` inside."""

    units: float = 1.0


class ThreadTuner:
    """Chooses the intra-op thread count of a repeated step: all threads (torch's count when the step
    starts) or one.

    The first ``2 * warmup`` steps alternate between the two; then the one with the lower median time per
    unit (token) over its last ``window`` steps runs, and the other is tried again for two steps after
    ``probe_every`` steps (one step only when that one is ``slowdown`` times slower than the choice's median:
    it cannot win). A probe that confirms the choice doubles that interval (up to ``max_probe_every``); a
    probe faster by ``margin`` switches. Time spent probing the slower count is the price: a few percent.
    When the load changes under the chosen count (``patience`` steps in a row more than ``slowdown`` times
    its median: another process took a core), what was measured is stale: the tuner starts over with the
    warm-up, instead of waiting for its next probe (up to ``max_probe_every`` steps away).
    """

    def __init__(
        self, *, warmup: int = 3, window: int = 5, probe_every: int = 16, max_probe_every: int = 256, margin: float = 0.9,
        slowdown: float = 1.5, patience: int = 3,
    ) -> None:
        self.warmup, self.margin, self.slowdown, self.patience = warmup, margin, slowdown, patience
        self.first_probe_every, self.max_probe_every = probe_every, max_probe_every
        self.times: dict[str, deque[float]] = {"all": deque(maxlen=window), "one": deque(maxlen=window)}
        self.choice = "all"
        self._start_over()

    def _start_over(self) -> None:
        for times in self.times.values():
            times.clear()
        self.steps = self.probe_left = self.since_probe = self.slow_steps = 0
        self.probe_every = self.first_probe_every

    def _next(self) -> str:
        if self.steps < 2 * self.warmup:
            return ("all", "one")[self.steps % 2]
        if self.probe_left:
            return "one" if self.choice == "all" else "all"
        return self.choice

    def _record(self, kind: str, seconds: float) -> None:
        settled = self.steps >= 2 * self.warmup and not self.probe_left and kind == self.choice
        if settled and self.times[kind] and seconds > self.slowdown * statistics.median(self.times[kind]):
            self.slow_steps += 1
            if self.slow_steps >= self.patience:  # the load changed: measure both counts afresh
                self._start_over()
                return
        else:
            self.slow_steps = 0
        self.times[kind].append(seconds)
        self.steps += 1
        if self.steps == 2 * self.warmup:
            self._decide(initial=True)
        elif self.probe_left:
            self.probe_left -= 1
            if not self.probe_left or seconds > self.slowdown * statistics.median(self.times[self.choice]):
                self.probe_left = 0  # done, or hopeless: a step this much slower than the choice cannot win
                self._decide(initial=False)
        else:
            self.since_probe += 1
            if self.since_probe >= self.probe_every:
                self.since_probe, self.probe_left = 0, 2

    def _decide(self, *, initial: bool) -> None:
        other = "one" if self.choice == "all" else "all"
        mine, theirs = statistics.median(self.times[self.choice]), statistics.median(self.times[other])
        self.since_probe = 0
        if theirs < self.margin * mine or (initial and theirs < mine):
            self.choice, self.probe_every = other, self.first_probe_every
        elif not initial:
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)

    @contextmanager
    def step(self, units: float = 1.0) -> Iterator[StepSize]:
        """Run one step at the chosen count, timed; the count in force before is restored afterwards. The step's
        size (``units``, e.g. tokens) can also be set inside, on the `StepSize` this yields."""
        import torch

        size = StepSize(units)
        before = torch.get_num_threads()
        if pinned() or before == 1:
            yield size
            return
        kind = self._next()
        if kind == "one":
            torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            yield size
        finally:
            elapsed = time.perf_counter() - start
            if kind == "one":
                torch.set_num_threads(before)
        self._record(kind, elapsed / max(size.units, 1e-9))


class ThreadChoice:
    """The intra-op thread count of one model's generation steps (``step("prefill", tokens)``,
    ``step("decode")``, entered by `tinyvlm.generation` around each step): ``threads`` when given, set for
    the step and restored after it; otherwise one `ThreadTuner` per workload, kept across generations so that
    what it measured carries over."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = None if threads is None else check_threads(threads)
        self.tuners: dict[str, ThreadTuner] = {}

    @contextmanager
    def step(self, workload: str, units: float = 1.0) -> Iterator[None]:
        if self.threads is not None:
            with fixed_threads(self.threads):
                yield
            return
        with self.tuners.setdefault(workload, ThreadTuner()).step(units):
            yield
