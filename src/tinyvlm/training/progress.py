"""What a run shows and records: a progress line on stderr and ``metrics.jsonl``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class Progress:
    """One status line on a terminal (``step 120/500 | loss 1.234 | 5.3k tok/s | ETA 1:23``), or a plain
    line every ``log_every`` steps when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.began = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, *, force: bool = False) -> None:
        if not self.enabled or not (self.tty or force):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        line = (f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {_human(tokens_per_s)} tok/s | "
                f"ETA {_clock(eta)}")
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
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

    def truncate_after(self, step: int) -> None:
        """Drop lines a killed run wrote after the checkpoint it resumes from (they will be written again)."""
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **values: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")
