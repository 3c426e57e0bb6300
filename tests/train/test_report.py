"""The run's metrics file read back: a resumed run logs the steps after its checkpoint again and a
killed one may leave a line cut short; the reader and the final loss plot count each step once."""
import json

import pytest

from lasp2.report import plot_losses, read_metrics


def _resumed_and_cut(path):
    lines = [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 1, "val_loss": 4.5}, {"step": 2, "loss": 3.9},
             {"step": 1, "loss": 4.1}, {"step": 1, "val_loss": 4.4}, {"step": 2, "loss": 3.8}]  # resumed after step 0
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo')  # cut short by a kill


def test_each_step_counts_once_with_its_last_record(tmp_path):
    _resumed_and_cut(tmp_path / "metrics.jsonl")
    train, val = read_metrics(tmp_path / "metrics.jsonl")
    assert {step: r["loss"] for step, r in train.items()} == {0: 5.0, 1: 4.1, 2: 3.8} and list(train) == [0, 1, 2]
    assert val == {1: 4.4}


def test_loss_plot_of_a_resumed_killed_run(tmp_path):
    pytest.importorskip("matplotlib")
    _resumed_and_cut(tmp_path / "metrics.jsonl")
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png", "resumed")
    assert (tmp_path / "loss.png").stat().st_size > 0
