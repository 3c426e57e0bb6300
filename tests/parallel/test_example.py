"""The README's torchrun example runs and agrees with the single device."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_torchrun_example_runs():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "examples" / "lasp2_torchrun.py")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = [float(d) for d in re.findall(r"relative difference from one device ([0-9.e+-]+)", done.stdout)]
    assert len(diffs) == 2, done.stdout
    assert max(diffs) < 1e-5
    assert "torchrun" in (ROOT / "README.md").read_text() and "examples/lasp2_torchrun.py" in (ROOT / "README.md").read_text()
