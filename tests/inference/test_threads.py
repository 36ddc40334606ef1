"""Intra-op threads (tinyvlm.inference.threads): validation and the per-step tuner, on a fake clock (no timed tests:
the busy-core figures come from ``benchmarks/decode.py --busy``)."""

from __future__ import annotations

import pytest
import torch

import tinyvlm
from tinyvlm.inference import threads
from tinyvlm.errors import ConfigError
from tinyvlm.inference.threads import ThreadTuner, check_threads, set_threads


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_pinned", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_thread_counts_are_validated(bad):
    with pytest.raises(ConfigError, match=r"threads must be an integer >= 1"):
        check_threads(bad)
    with pytest.raises(ConfigError, match=r"threads must be an integer >= 1"):
        tinyvlm.build_decoder("test-llama", pretrained=False, threads=bad)


def test_set_threads_fixes_the_count(restore_threads):
    set_threads(1)
    assert torch.get_num_threads() == 1 and threads.pinned()
    set_threads(None)  # leaves it
    assert torch.get_num_threads() == 1


class FakeClock:
    """Stands in for ``time`` in `tinyvlm.inference.threads`: a step takes ``cost[threads]`` seconds of its time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _run(tuner: ThreadTuner, clock: FakeClock, steps: int, cost: dict[int, float]) -> list[int]:
    """Steps that take ``cost[threads]`` (fake) seconds; returns the count each ran at."""
    seen = []
    for _ in range(steps):
        with tuner.step():
            seen.append(torch.get_num_threads())
            clock.now += cost[torch.get_num_threads()]
    return seen


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(threads, "time", fake)
    return fake


@pytest.fixture
def many(restore_threads) -> int:
    torch.set_num_threads(2)  # the tuner chooses between torch's count and one; any count >= 2 will do
    return 2


def test_tuner_settles_on_the_faster_count_and_restores_it(many, clock):
    seen = _run(ThreadTuner(), clock, 40, {many: 4.0, 1: 1.0})  # one thread faster: a busy machine
    assert torch.get_num_threads() == many  # restored after every step
    assert seen[:6] == [many, 1] * 3  # warm-up alternates
    # then one thread, with a probe at the other count after 16 steps (one step: 4x slower cannot win), then 32
    assert seen[6:22] == [1] * 16 and seen[22] == many and seen[23:] == [1] * 17
    seen = _run(ThreadTuner(), clock, 40, {many: 1.0, 1: 4.0})  # all threads faster: an idle machine
    assert seen[6:22] == [many] * 16 and seen[22] == 1 and seen[23:] == [many] * 17


def test_a_probe_close_to_the_choice_takes_two_steps(many, clock):
    tuner = ThreadTuner()
    seen = _run(tuner, clock, 40, {many: 1.0, 1: 1.2})  # one thread slower, but by less than 1.5x
    assert seen[22:24] == [1] * 2 and seen[24:] == [many] * 16 and tuner.probe_every == 32


def test_tuner_follows_a_change_of_load(many, clock):
    tuner = ThreadTuner()
    _run(tuner, clock, 30, {many: 1.0, 1: 4.0})
    assert tuner.choice == "all"
    seen = _run(tuner, clock, 80, {many: 6.0, 1: 1.0})  # the machine got busy
    # three steps in a row 1.5x slower than the median start the warm-up over (not waiting 32 steps for the next
    # probe), which picks one thread; probing restarts at 16 steps
    assert seen == [many] * 3 + [many, 1] * 3 + [1] * 16 + [many] + [1] * 32 + [many] + [1] * 21
    assert tuner.choice == "one"


def test_tuner_ignores_a_slow_step_or_two(many, clock):
    tuner = ThreadTuner()
    _run(tuner, clock, 10, {many: 1.0, 1: 4.0})
    seen = _run(tuner, clock, 2, {many: 6.0, 1: 4.0})  # two slow steps (a hiccup), then back to normal
    seen += _run(tuner, clock, 10, {many: 1.0, 1: 4.0})
    assert seen == [many] * 12 and tuner.choice == "all" and tuner.steps == 22  # no warm-up again


def test_tuner_keeps_its_choice_within_the_margin(many, clock):
    tuner = ThreadTuner()
    _run(tuner, clock, 60, {many: 1.0, 1: 0.95})  # one thread 5 % faster: inside the 10 % margin
    assert tuner.choice == "one"  # the warm-up takes the faster one outright
    tuner = ThreadTuner()
    _run(tuner, clock, 6, {many: 1.0, 1: 2.0})
    seen = _run(tuner, clock, 60, {many: 1.0, 1: 0.95})  # later probes need a 10 % gain to switch
    assert tuner.choice == "all" and seen.count(1) == 4  # two probes of two steps (after 16, then 32 steps)


def test_tuner_divides_by_units(many, clock):
    tuner = ThreadTuner()
    for step in range(6):  # all threads ran steps 4x longer but with 8x the tokens: faster per token
        kind_many = step % 2 == 0
        with tuner.step(units=8.0 if kind_many else 1.0):
            clock.now += 4.0 if kind_many else 1.0
    assert tuner.choice == "all"


def test_a_fixed_count_is_never_tuned(restore_threads, clock):
    set_threads(2)
    seen = _run(ThreadTuner(), clock, 10, {2: 3.0, 1: 0.0})
    assert set(seen) == {2}


def test_omp_num_threads_fixes_the_count(restore_threads, clock, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen = _run(ThreadTuner(), clock, 10, {2: 3.0, 1: 0.0})
    assert set(seen) == {2}


def test_a_step_can_set_its_size_inside(many, clock):
    tuner = ThreadTuner()
    for step in range(6):  # as test_tuner_divides_by_units, the size known only inside the step
        with tuner.step() as size:
            all_threads = step % 2 == 0
            size.units = 8.0 if all_threads else 1.0
            clock.now += 4.0 if all_threads else 1.0
    assert tuner.choice == "all"
