"""The README's torchrun examples run and agree with the single device."""
import re
from pathlib import Path

from tests.helpers import run_example as run

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, measure: str) -> list[float]:
    """Runs examples/<name> on two ranks; -> the figures after `measure` it printed."""
    return [float(d) for d in re.findall(measure + r" ([0-9.e+-]+)", run(name, timeout=240).stdout)]


def test_readme_torchrun_example_runs():
    diffs = run_example("lasp2_torchrun.py", "relative difference from one device")
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs
    assert "torchrun" in (ROOT / "README.md").read_text()


def test_readme_packed_documents_example_runs():
    diffs = run_example("packed_documents.py", "relative difference from each document alone")
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs
