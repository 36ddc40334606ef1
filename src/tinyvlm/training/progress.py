"""What a run shows and records: a progress line on stderr, ``metrics.jsonl`` and the trackers of
``--report-to`` (`tinyvlm.training.tracking`)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from tinyvlm.training.tracking import Tracker, scalars_of


class Progress:
    """One status line on a terminal (``step 120/500 | loss 1.234 | 5.3k tok/s | ETA 1:23``), or a plain
    line every ``log_every`` steps when stderr is not a terminal. ``show_bar=False`` (``--no-progress``)
    hides the status and the messages but not the results (`result`: held-out figures, skipped data, where
    the model went). Only the main process prints."""

    def __init__(self, total: int, start: int, *, show_bar: bool, main: bool):
        self.total, self.start = total, start
        self.enabled, self.main = show_bar and main, main
        self.tty = sys.stderr.isatty()
        self.began = time.perf_counter()
        self._activity: str | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, *, force: bool = False, skipped: int = 0) -> None:
        if not self.enabled or not (self.tty or force):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        line = (f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {_human(tokens_per_s)} tok/s | "
                f"ETA {_clock(eta)}" + (f" | skipped {skipped}" if skipped else ""))
        self._write(line)

    def activity(self, text: str | None) -> None:
        """What the run is doing between steps (``evaluating: answers 3/8 batches``): the status line on a
        terminal, else one line each time the phase (the text before its counts) changes. None ends it."""
        if not self.enabled or text is None:
            if text is None and self.enabled and self.tty and self._activity is not None:
                sys.stderr.write("\r\033[K")
            self._activity = None
            return
        phase = re.sub(r"\s*\d+/\d+.*$", "", text)
        if self.tty or phase != self._activity:
            self._write(text)
        self._activity = phase

    def _write(self, line: str) -> None:
        sys.stderr.write("\r" + line + "\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
            sys.stderr.flush()

    def result(self, text: str) -> None:
        """A line the run reports whatever ``show_bar`` says."""
        if self.main:
            sys.stderr.write(("\r\033[K" if self.tty and self.enabled else "") + text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _human(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class MetricsLog:
    """Appends one JSON object per line to ``output/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.trackers: list[Tracker] = []  # --report-to: each line also goes to them, as scalars

    def truncate_after(self, step: int, *, final_step: int) -> None:
        """Drop lines a killed run wrote after the checkpoint it resumes from, and the final evaluation (at
        ``final_step``, after the last checkpoint): they will be written again, once."""
        if self.enabled and self.path.exists():
            entries = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [entry for entry in entries if entry.get("step", 0) <= step
                    and not (entry.get("step") == final_step and "val_loss" in entry)]
            self.path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))

    def write(self, **values: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")
            scalars = scalars_of(values)
            for tracker in self.trackers:
                tracker.log(scalars, values["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
