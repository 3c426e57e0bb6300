"""The command line: bad configurations fail in one line naming the flag, before training;
the README's torchrun command runs (shortened)."""
import subprocess
import sys
from pathlib import Path

import pytest

from lasp2.train import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,env,flag", [
    (["--sp", "3"], {"WORLD_SIZE": "2"}, "--sp 3"),
    (["--layout", "zigzag", "--seq-len", "7"], {}, "--seq-len 7"),
    (["--sp-linear", "lasp9"], {}, "--sp-linear"),
    (["--linear-kind", "mamba"], {}, "--linear-kind"),
    (["--data", "/no/such/corpus"], {}, "--data /no/such/corpus"),
    (["--batch-size", "0"], {}, "--batch-size 0"),
    (["--sp-linear", "ring", "--linear-kind", "gla"], {}, "--sp-linear ring"),
    (["--sp-linear", "ring", "--linear-kind", "gated_deltanet"], {}, "--sp-linear ring has no delta-rule form"),
    (["--hybrid", "2/3", "--steps", "1"], {}, "--hybrid 2/3"),
    (["--pattern", "LLX"], {}, "--pattern LLX"),
    (["--doc-sep", "\\n\\n"], {}, "--doc-sep"),
    (["--hf-config", "/no/such/config.json"], {}, "--hf-config /no/such/config.json"),
    (["--grad-accum", "3"], {}, "--grad-accum 3 must divide the 8 rows"),
])
def test_bad_configuration_is_one_line(capsys, monkeypatch, tmp_path, args, env, flag):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--sp ", "--sp-linear", "--sp-softmax", "--layout", "--seq-len", "--batch-size", "--steps", "--lr",
                 "--ckpt-every", "--resume", "--data", "--tokenizer", "--data-parallel", "--vocab-size", "--checkpointing"):
        assert flag in text
    assert "(default: lasp2)" in text and "(default: zigzag)" in text and "(default: allgather)" in text


def test_torchrun_two_ranks_end_to_end(tmp_path):
    """The README's run command, shortened: 2 SP ranks under torchrun write metrics, plot, checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lasp2.train",
           "--sp", "2", "--steps", "4", "--seq-len", "64", "--batch-size", "2", "--val-every", "2", "--val-batches", "1",
           "--ckpt-every", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dp 1 x sp 2 (lasp2 + allgather, zigzag; sharded over 2 ranks)" in done.stdout
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step_0000003"
