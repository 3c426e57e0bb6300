"""`python -m lasp2_bench convergence`: the study's configurations, the trainer's command for each,
the Table-4 layout and the orderings read from the rows; end to end at toy size under torchrun
(sp=2), skipping what is done and rebuilding a row from a finished run directory."""
import argparse
import csv
import json

from pathlib import Path

import pytest

from lasp2.model import LINEAR_KINDS
from lasp2_bench import convergence
from lasp2_bench.__main__ import build_parser, main


def read(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_kind_at_every_ratio_and_one_softmax_baseline():
    runs = convergence.configurations(list(LINEAR_KINDS) + ["softmax"], convergence.RATIOS, [0])
    assert len(runs) == len(LINEAR_KINDS) * 4 + 1
    assert {r["pattern"] for r in runs if r["kind"] == "gla"} == {"L", "LLLLLLLN", "LLLN", "LN"}
    assert [r for r in runs if r["kind"] == "softmax"] == [{"kind": "softmax", "ratio": "1", "pattern": "N", "seed": 0}]
    assert len(convergence.configurations(["basic"], ["0"], [0, 1])) == 2


def test_trainer_command_is_lasp2_for_linear_and_allgather_for_softmax_layers(tmp_path):
    args = build_parser().parse_args(["convergence", "--sp", "2"])
    assert args.preset == "tiny" and args.kinds[-1] == "softmax"
    cmd = convergence.trainer_command({"kind": "kda", "ratio": "1/8", "pattern": "LLLLLLLN", "seed": 3}, args, tmp_path,
                                      resume=True)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and cmd[5] == "2"
    flags = dict(zip(cmd[8::2], cmd[9::2]))
    assert (flags["--linear-kind"], flags["--hybrid"], flags["--sp-linear"], flags["--sp-softmax"], flags["--seed"]) == (
        "kda", "1/8", "lasp2", "allgather", "3")
    assert cmd[-1] == "--resume"
    baseline = convergence.trainer_command({"kind": "softmax", "ratio": "1", "pattern": "N", "seed": 0}, args, tmp_path,
                                           resume=False)
    assert "--resume" not in baseline and baseline[baseline.index("--hybrid") + 1] == "1"


def _row(kind, ratio, loss, seed=0):
    return {"kind": kind, "ratio": ratio, "seed": str(seed), "status": "ok", "val_loss": str(loss)}


def test_table_and_findings_from_rows():
    rows = [_row("basic", "0", 2.5), _row("basic", "0", 2.55, seed=1), _row("basic", "1/4", 2.4), _row("basic", "1/4", 2.44, seed=1),
            _row("gla", "0", 2.3), _row("gla", "1/4", 2.35), _row("softmax", "1", 2.38),
            dict(_row("based", "0", 1.0), status="failed (exit 1)")]
    table = convergence.table(rows).splitlines()
    assert table[0] == "| module | pure (0) | 1/8 | 1/4 | 1/2 |"
    assert table[2] == "| basic | 2.500 / 2.550 (2.892) |  | 2.400 / 2.440 (2.824) | (2.775) |"
    assert table[3] == "| gla | 2.300 (2.845) |  | 2.350 (2.754) | (2.753) |"
    assert table[4] == "| softmax (Llama 3) | 2.380 (2.759) | | | |"
    assert len(table) == 5  # the failed row is left out
    found = convergence.findings(rows)
    assert "seed spread (max - min; other validation batches too): basic 0 0.050, basic 1/4 0.040" in found
    assert "hybrid - pure by seed: basic 1/4 -0.100 / -0.110" in found
    assert "hybrid 1/4 beats pure for 1/2 kinds; not for gla (+0.050)" in found
    assert "rank order at 0, best first: ours gla < basic; paper gla < basic" in found
    assert "rank order at 1/4, best first: ours gla < basic; paper gla < basic" in found
    assert "softmax baseline 2.380; 2/4 linear configurations below it; not basic 0, basic 1/4" in found


def test_study_end_to_end_skips_what_is_done_and_resumes_a_finished_run(tmp_path, capsys):
    out, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["convergence", "--kinds", "basic", "softmax", "--ratios", "0", "1/2", "--preset", "tiny", "--sp", "2",
            "--steps", "4", "--seq-len", "64", "--batch-size", "2", "--warmup", "1", "--val-every", "2",
            "--val-batches", "1", "--runs", str(runs), "--out", str(out), "--timeout", "300"]
    main(argv)
    rows = read(out / "convergence.csv")
    assert [(r["kind"], r["ratio"], r["status"]) for r in rows] == [("basic", "0", "ok"), ("basic", "1/2", "ok"),
                                                                     ("softmax", "1", "ok")]
    for r in rows:  # each row is its run's own final validation loss and curve
        assert r["run_dir"].startswith(str(runs / "tiny-sp2-4x2x64-lr0.002-warmup1-val2x1"))
        records = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        val = [x["val_loss"] for x in records if "val_loss" in x]
        assert len(val) == 2 and float(r["val_loss"]) == round(val[-1], 4)
        assert r["tokens"] == str(4 * 2 * 64) and r["curve"].split()[-1] == f"512:{val[-1]:.4f}"
        assert 0 < float(r["val_loss"]) < 6
    pure, hybrid, baseline = rows
    assert len({pure["val_loss"], hybrid["val_loss"], baseline["val_loss"]}) == 3  # three different models
    assert (out / "convergence.md").read_text().count("| basic |") == 1 and (out / "convergence.png").stat().st_size > 0
    capsys.readouterr()
    main(argv)  # everything is done: nothing runs
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    # a row lost from the CSV is rebuilt from its finished run directory (the trainer resumes, has no step left)
    with (out / "convergence.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=convergence.FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[1:])
    main(argv)
    again = {(r["kind"], r["ratio"]): r for r in read(out / "convergence.csv")}
    assert again[("basic", "0")]["val_loss"] == pure["val_loss"] and again[("basic", "0")]["status"] == "ok"
    assert "resumed" in capsys.readouterr().out
    # other settings in the same CSV: trained apart, neither reused nor tabled with these
    main(argv[:argv.index("--steps") + 1] + ["2"] + argv[argv.index("--steps") + 2:] + ["--kinds", "softmax"])
    both = read(out / "convergence.csv")
    assert len(both) == 4 and {r["steps"] for r in both} == {"4", "2"}
    assert "| softmax (Llama 3) |" in (out / "convergence.md").read_text()
    assert "| basic |" not in (out / "convergence.md").read_text()


def test_a_failing_configuration_is_a_row_not_a_crash(tmp_path):
    """--seq-len 10 cannot be split over 2 zigzag ranks: the trainer refuses it, the study goes on."""
    out = tmp_path / "results"
    main(["convergence", "--kinds", "softmax", "--sp", "2", "--steps", "2", "--seq-len", "10", "--runs",
          str(tmp_path / "runs"), "--out", str(out)])
    (row,) = read(out / "convergence.csv")
    assert row["status"].startswith("failed (exit ") and row["val_loss"] == ""
    assert "--seq-len 10 must be a positive multiple of 4" in (Path(row["run_dir"]) / "train.log").read_text()
    assert "; 0 configurations, 0 min of training" in (out / "convergence.md").read_text()


def test_metrics_of_a_resumed_run_count_each_step_once(tmp_path):
    lines = [{"step": 0, "loss": 5.0, "tokens_per_s": 10}, {"step": 1, "loss": 4.0, "tokens_per_s": 10},
             {"step": 1, "val_loss": 4.5}, {"step": 2, "loss": 3.9, "tokens_per_s": 10},
             {"step": 1, "loss": 4.1, "tokens_per_s": 20}, {"step": 1, "val_loss": 4.4},  # resumed after step 0
             {"step": 2, "loss": 3.8, "tokens_per_s": 20}]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo'  # cut short by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    val, train, rates = convergence.read_metrics(tmp_path)
    assert val == [(1, 4.4)] and train == [5.0, 4.1, 3.8] and rates == [10, 20, 20]


def test_unknown_kind_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convergence", "--kinds", "mamba"])
    assert isinstance(build_parser().parse_args(["convergence"]), argparse.Namespace)
