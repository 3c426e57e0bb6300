"""The projection reproduces the cells it is fitted to, and everything it prints comes from the
model (changing an assumption changes the predictions)."""
import io
import json
from types import SimpleNamespace

import pytest

from lasp2_bench import project
from lasp2_bench.machine import write_csv


def test_fit_reproduces_its_cells_and_predicts_the_rest():
    overhead, mfu = project.fit_overhead_mfu(project.A100)
    assert overhead > 0 and mfu > 0
    for W, N, tps in project.FIT_CELLS:
        got = project.step_seconds("lasp2", N, W, project.A100, overhead, mfu)["tokens_per_s"]
        assert got == pytest.approx(tps, rel=1e-6)
    slower_ib = dict(project.A100, beta_inter=project.A100["beta_inter"] / 4)
    W, N, _ = project.PAPER_CELLS[-1]
    base = project.step_seconds("lasp2", N, W, project.A100, overhead, mfu)["seconds"]
    assert project.step_seconds("lasp2", N, W, slower_ib, overhead, mfu)["seconds"] > base


def test_hop_latency_fit_hits_the_paper_gain():
    overhead, mfu = project.fit_overhead_mfu(project.A100)
    extra = project.fit_hop_latency(project.A100, overhead, mfu)
    assert project._gain("lasp1", 2097152, 64, project.A100, overhead, mfu, extra) == pytest.approx(0.152, abs=1e-6)


def test_project_writes_tables_and_plot(tmp_path):
    out = io.StringIO()
    project.run(SimpleNamespace(calibrate=None), tmp_path, out)
    text = out.getvalue()
    assert "assumptions:" in text and "predicted" in text
    assert {p.name for p in tmp_path.iterdir()} >= {"paper.csv", "paper-64gpu-table.csv", "paper.png", "exchanges.csv",
                                                    "exchanges.png"}


def test_zeco_cells_two_fit_two_predicted_within_25_percent(tmp_path):
    """LASP-2's two cells fix the network's overhead and bandwidth exactly; the model then
    predicts All-Scan's two (allscan, P = 8) within 25%, and the exchange with the fewest bytes
    through a rank wins at 256 GPUs on that network for the GLA layer (logscan or allscan, never
    LASP-2's all-gather)."""
    rows = project.project_exchanges(io.StringIO(), tmp_path)
    zeco = [r for r in rows if r["kind"] == "zeco"]
    for r in zeco:
        assert abs(r["error"]) < (1e-9 if r["role"] == "fit" else 0.25), r
    at_256 = {r["method"]: r for r in rows if r["kind"] == "scale" and r["W"] == 256 and r["network"] == "ZeCO-fitted H100"
              and r["layer"].startswith("GLA")}
    fastest = [m for m, r in at_256.items() if r["role"] == "fastest"]
    assert fastest in (["logscan"], ["allscan"]) and at_256["lasp2"]["seconds"] > 3 * at_256[fastest[0]]["seconds"]
    assert at_256["allscan"]["bytes_through"] == at_256["lasp1"]["bytes_through"] < at_256["logscan"]["bytes_through"]


def test_local_calibration_predicts_from_the_runs_own_parameters(tmp_path):
    rate = 1e10
    calib = [{"family": "calibration", "world": 2, "rate": rate, "allgather_alpha": 1e-4, "allgather_beta": 1e9,
              "p2p_alpha": 1e-4, "p2p_beta": 1e9, **{f"rate_{k}": rate for k in
                                                      ("chunk", "left_product", "softmax_block", "sdpa_masked", "sdpa_causal")}}]
    (tmp_path / "attn-calibration.json").write_text(json.dumps(calib))
    # LASP-2 at C = 2048 tokens per rank, H = 8, K = V = 64: the gather (2 x (α + 64·64·8·4 bytes / β)
    # ≈ 0.5 ms) hides behind the intra-chunk compute, so the time is the compute at `rate`.
    want = 3 * 8 * 2048 * (2 * 64 * 128 + 4 * 64 * 64) / rate
    write_csv(tmp_path / "attn.csv", [dict(family="linear", method="lasp2", world=2, T=4096, layout="contiguous",
                                           status="ok", median_ms=2e3 * want)], ["family", "method", "world", "T", "layout",
                                                                                 "status", "median_ms"])
    rows = project.calibrate_local(tmp_path / "attn.csv", io.StringIO())
    assert len(rows) == 1 and rows[0]["ratio"] == pytest.approx(0.5)


def test_project_without_matplotlib_prints_its_tables_and_skips_the_plot(tmp_path, monkeypatch):
    """matplotlib is an optional extra: `lasp2-bench project` still prints and writes its tables,
    and says in one line that it drew no plot."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = io.StringIO()
    project.run(SimpleNamespace(calibrate=None), tmp_path, out)
    text = out.getvalue()
    assert "predicted" in text and "no paper.png (matplotlib is not installed: pip install lasp2[bench])" in text
    assert "no exchanges.png (matplotlib is not installed" in text
    assert {p.name for p in tmp_path.iterdir()} == {"paper.csv", "paper-64gpu-table.csv", "exchanges.csv"}
