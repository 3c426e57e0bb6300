"""The scripts under benchmarks/ run as documented (tiny sizes) and print their tables."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*argv):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_ops(tmp_path):
    out = run("benchmarks/bench_ops.py", "--T", "128", "--forms", "none", "token", "kda", "--repeats", "1", "--warmup", "0",
              "--out", str(tmp_path / "ops.csv"))
    assert "%roof" in out and "kda" in out and (tmp_path / "ops.csv").read_text().count("\n") == 4


def test_bench_delta():
    out = run("benchmarks/bench_delta.py", "--T", "128", "--H", "2", "--D", "8", "--repeats", "1", "--warmup", "0")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("128")]
    assert len(rows) == 1 and float(rows[0][1]) > 0


def test_bench_peers(tmp_path):
    """Every recurrence at a tiny size: lasp2's row, each installed peer's, outputs that agree
    (a DIFFERS mark would be printed), a peer that is missing named on a 'skipped' line."""
    import csv

    out = run("benchmarks/bench_peers.py", "--T", "128", "--H", "2", "--D", "16", "--repeats", "1", "--warmup", "0",
              "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "peers.csv").open()))
    assert {r["recurrence"] for r in rows if r["op"] == "lasp2"} == {"none", "head", "token", "channel", "deltanet",
                                                                     "gated_deltanet", "kda"}
    assert "DIFFERS" not in out and all(float(r["relative_difference"]) < 1e-3 for r in rows)
    peers = [r for r in rows if r["op"] != "lasp2"]
    assert peers or out.count("skipped") == 7  # with transformers installed: its SSD and delta-rule paths
    assert all(float(r["ratio_to_lasp2"]) > 0 for r in peers)


def test_bench_memory(tmp_path):
    """Every op, both policies, tiny: checkpointed, each keeps nothing; plain, each keeps some."""
    import csv

    out = run("benchmarks/bench_memory.py", "--T", "128", "--H", "2", "--D", "16", "--repeats", "1", "--warmup", "0",
              "--dtypes", "float32", "--policies", "cpu", "cuda", "--ops", "token", "kda", "softmax", "conv",
              "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    assert len(rows) == 4 * 2 * 2 and "held MB" in out
    assert all(float(r["held_mb"]) == 0 for r in rows if r["mode"] == "checkpointed")
    assert all(float(r["held_bytes_per_token_head"]) > 0 for r in rows if r["mode"] == "plain" and r["op"] != "softmax")


def test_bench_setup():
    """The trainer's setup on 2 ranks (the debug preset, this README as the corpus): each rank's
    peak RSS."""
    out = run("benchmarks/bench_setup.py", "--preset", "debug", "--sp", "2", "--", "--data", str(ROOT / "README.md"))
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and all("peak RSS" in line for line in lines)
