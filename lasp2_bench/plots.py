"""PNG plots of benchmark rows: one panel per W, one line per method. matplotlib is optional
(the `bench` extra): without it the benchmarks print and write their tables, and skip the plots
with one line saying so (NO_MATPLOTLIB)."""
from __future__ import annotations

from pathlib import Path

NO_MATPLOTLIB = "matplotlib is not installed: pip install lasp2[bench]"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lines_by_method(rows: list[dict], x: str, y: str, ylabel: str, path: Path, title: str,
                    panel: str = "world") -> bool:
    """rows with numeric `x` and `y`; one subplot per value of `panel`, one line per (family,
    method). Returns whether `path` was written (False: nothing to draw, or no matplotlib)."""
    rows = [r for r in rows if r.get(y) not in (None, "")]
    plt = pyplot()
    if not rows or plt is None:
        return False
    panels = sorted({r[panel] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, value in zip(axes[0], panels):
        series = {}
        for r in rows:
            if r[panel] == value:
                series.setdefault(f"{r['family']} {r['method']}", []).append((float(r[x]), float(r[y])))
        for name, points in sorted(series.items()):
            points.sort()
            # dashed: softmax attention, or a model pattern with softmax ("N") layers
            dashed = name.startswith("softmax") or "N" in name.split()[0]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                    linestyle="--" if dashed else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {panel}={value}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
