"""What a run reports: a progress line on rank 0, metrics as JSON lines, a loss plot at the end."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`step 37/200 [#####.....] loss 2.914 | 5.1k tok/s | ETA 1m02s`, redrawn in place on a
    terminal, one line per `every` steps otherwise."""

    def __init__(self, total: int, enabled: bool, every: int = 10, stream=sys.stdout):
        self.total, self.enabled, self.every, self.stream = total, enabled, every, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.first_step = None

    def update(self, step: int, loss: float, tokens_per_s: float, detail: str = "") -> None:
        if not self.enabled:
            return
        self.first_step = step if self.first_step is None else self.first_step
        done = step + 1
        rate = (time.perf_counter() - self.start) / max(1, done - self.first_step)
        filled = int(20 * done / self.total)
        line = (f"step {done}/{self.total} [{'#' * filled}{'.' * (20 - filled)}] loss {loss:.4f} | "
                f"{tokens_per_s / 1e3:.1f}k tok/s{detail} | ETA {_duration(rate * (self.total - done))}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        elif done % self.every == 0 or done == self.total or done == self.first_step + 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: training record}, {step: validation loss}) from a metrics file, in step order. A run
    resumed from a checkpoint logs again the steps after it: the last record of a step counts; a
    line cut short by a killed run is skipped."""
    train, val = {}, {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "val_loss" in record:
            val[record["step"]] = record["val_loss"]
        elif "loss" in record:
            train[record["step"]] = record
    return dict(sorted(train.items())), dict(sorted(val.items()))


def plot_losses(metrics: Path, png: Path, title: str) -> bool:
    """Training loss per step and validation loss where measured, from the metrics file.
    Returns False, writing nothing, when matplotlib is not installed (`pip install lasp2[bench]`)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(list(train), [record["loss"] for record in train.values()], label="train", linewidth=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True
