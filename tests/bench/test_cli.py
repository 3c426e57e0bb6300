"""`python -m lasp2_bench attn|model` end to end at toy sizes: tables, CSV and plots written,
every measured byte count equal to the formula, and a configuration that does not fit reported
as out of memory instead of failing the run."""
import csv

from lasp2_bench.__main__ import main
from lasp2_bench.model import longest_fitting, merge_rows


def read(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_attn_command(tmp_path):
    main(["attn", "--world", "2", "--T", "128", "256", "--H", "2", "--D", "8", "--kv-heads", "2", "--warmup", "0",
          "--repeats", "1", "--delta", "lasp2", "lasp1", "ulysses", "--out", str(tmp_path)])
    rows = read(tmp_path / "attn.csv")
    assert len(rows) == 2 * 13 and all(r["status"] == "ok" for r in rows)  # 7 linear, 3 softmax, 3 delta methods
    assert {r["method"] for r in rows if r["family"] == "delta"} == {"lasp2", "lasp1", "ulysses"}
    assert all(r["bytes_per_rank"] == r["formula_bytes"] for r in rows)
    assert all(float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"]) for r in rows)
    assert (tmp_path / "attn-time.png").stat().st_size > 0 and (tmp_path / "machine.json").is_file()


def test_attn_weak_command_times_each_pass_against_independent_runs(tmp_path):
    main(["attn", "--world", "2", "--weak", "128", "--linear", "lasp2", "ring", "--H", "2", "--D", "8", "--warmup", "0",
          "--repeats", "1", "--out", str(tmp_path)])
    rows = read(tmp_path / "attn-weak.csv")
    # every decay form for LASP-2; ring cannot express per-channel gates, so it has three
    assert sorted((r["method"], r["decay"]) for r in rows) == sorted(
        [("lasp2", d) for d in ("none", "head", "token", "channel")] + [("ring", d) for d in ("none", "head", "token")])
    for r in rows:
        assert r["world"] == "2" and r["tokens_per_rank"] == "128"
        for p in ("fwd", "bwd"):
            sp, alone = float(r[f"sp_{p}_ms"]), float(r[f"alone_{p}_ms"])
            assert sp > 0 and alone > 0 and float(r[f"{p}_ratio"]) == sp / alone


def test_model_command_and_memory_limit(tmp_path):
    main(["model", "--preset", "debug", "--sp", "2", "--patterns", "LLLN", "--linear", "lasp2", "--seq-len", "64",
          "--steps", "2", "--data-parallel", "shard", "replicate", "--out", str(tmp_path)])
    row, replicated = read(tmp_path / "model-debug.csv")
    for r, mode in ((row, "shard"), (replicated, "replicate")):  # the attention's bytes apart from FSDP's
        assert r["status"] == "ok" and r["data_parallel"] == mode and float(r["tokens_per_s"]) > 0
        assert r["bytes_per_rank"] == r["formula_bytes"] and int(r["dp_bytes_per_rank"]) > 0
    main(["model", "--preset", "debug", "--sp", "2", "--patterns", "L", "--linear", "lasp2", "--seq-len", "4096",
          "--steps", "1", "--mem-gb", "0.05", "--append", "--out", str(tmp_path)])
    kept, _, oom = read(tmp_path / "model-debug.csv")
    assert kept == row and (oom["pattern"], oom["status"]) == ("L", "out of memory")


def test_merge_rows_and_longest_fitting():
    def row(T, status="ok", peak=None):
        return dict(preset="debug", pattern="L", linear="lasp2", softmax="allgather", sp=2, batch=1, seq_len=T,
                    status=status, peak_mb=peak)

    old = [{k: str(v) if v is not None else "" for k, v in row(T, peak=T / 8).items()} for T in (1024, 2048)]
    rows = merge_rows(old, [row(2048, peak=300.0), row(4096, peak=500.0)])
    assert [(r["seq_len"], r["peak_mb"]) for r in rows] == [(1024, 128.0), (2048, 300.0), (4096, 500.0)]
    # the line through the last two peaks (200 MB per 2048 tokens) reaches 1 GiB at 4096 + 524 / 200 * 2048
    assert longest_fitting(rows, 1.0) == {("L", "lasp2", "replicate", False, False): (4096, None, 4096 + int(524 / 200 * 2048))}
    rows = merge_rows(rows, [row(8192, "out of memory"), row(16384, "out of memory")])
    assert longest_fitting(rows, 1.0)[("L", "lasp2", "replicate", False, False)][:2] == (4096, 8192)


def test_generate_command(tmp_path):
    """Both models at W = 1 and 2 (a 64-token prompt), transformers' generate beside them: the
    same tokens everywhere, the KV cache halved at W = 2, the states unchanged."""
    main(["generate", "--T", "64", "--world", "1", "2", "--new-tokens", "3", "--out", str(tmp_path)])
    rows = read(tmp_path / "generate.csv")
    assert sorted((r["model"], r["impl"], r["world"]) for r in rows) == sorted(
        [("qwen3-next", "lasp2", "1"), ("qwen3-next", "transformers", "1"), ("qwen3-next", "lasp2", "2"),
         ("linear-llama3", "lasp2", "1"), ("linear-llama3", "lasp2", "2")])
    assert all(r["status"] == "ok" and r["same_tokens"] == "True" and float(r["prefill_s"]) > 0 for r in rows)
    by = {(r["model"], r["impl"], r["world"]): r for r in rows}
    for model in ("qwen3-next", "linear-llama3"):
        one, two = by[(model, "lasp2", "1")], by[(model, "lasp2", "2")]
        assert int(one["state_bytes"]) == int(two["state_bytes"]) > 0
        assert int(two["kv_cache_bytes"]) < int(one["kv_cache_bytes"])
    assert by[("qwen3-next", "transformers", "1")]["kv_cache_bytes"] == by[("qwen3-next", "lasp2", "1")]["kv_cache_bytes"]
