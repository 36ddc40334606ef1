"""The curves of a run: ``metrics.png`` next to its ``metrics.jsonl``, with the training loss and the
held-out loss against the step on the left and the held-out exact match on the right. Written at the end of
every run (when matplotlib, the extra ``plot``, is installed) and by ``tinyvlm plot RUN``."""

from __future__ import annotations

import json
from pathlib import Path

from tinyvlm.errors import ConfigError

CURVES = "metrics.png"


def metrics_file(run: str | Path) -> Path:
    """``run``'s ``metrics.jsonl`` (``run`` is an output folder or the file itself)."""
    path = Path(run)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: give a training output folder (it holds metrics.jsonl) or the file")
    return path


def plot_run(run: str | Path) -> Path:
    """Draw ``metrics.png`` next to ``run``'s ``metrics.jsonl``; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install "tinyvlm[plot]"') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = metrics_file(run)
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    held_out = [(e["step"], e["val_loss"], e.get("val_accuracy")) for e in entries if "val_loss" in e]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    if train:
        left.plot(*zip(*train), label="training loss")
    if held_out:
        left.plot([s for s, _, _ in held_out], [v for _, v, _ in held_out], "o-", label="held-out loss")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.grid(alpha=0.3)
    if train or held_out:
        left.legend()
    accuracy = [(s, a) for s, _, a in held_out if a is not None]
    if accuracy:
        right.plot([s for s, _ in accuracy], [100 * a for _, a in accuracy], "o-", color="tab:green")
        right.set_ylim(0, 100)
    else:
        right.text(0.5, 0.5, "no held-out answers evaluated", ha="center", va="center", transform=right.transAxes)
    right.set(xlabel="step", ylabel="%", title="held-out exact match")
    right.grid(alpha=0.3)
    figure.suptitle(str(path.parent))
    target = path.parent / CURVES
    temporary = target.with_name(f".{CURVES}.tmp")
    figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    temporary.replace(target)
    return target


def curves_after_run(output: Path) -> str:
    """The end of a run: write its curves, or say how to get them when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f'curves not drawn (needs matplotlib): pip install "tinyvlm[plot]", then tinyvlm plot {output}'
    return f"wrote the loss and accuracy curves to {plot_run(output)}"
