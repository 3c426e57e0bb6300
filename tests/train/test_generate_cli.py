"""`python -m lasp2.generate`: a trainer checkpoint continues a prompt, on one process and over two
ranks (torchrun) with the same text as the trained model in memory; a Hugging Face run too; a
run directory without a checkpoint stops with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "def main(argv):\n    "


def _train(out: Path, *extra) -> torch.nn.Module:
    from lasp2.distributed import ParallelDims
    from lasp2.train import parse_config, train

    config = parse_config(["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--val-every", "3",
                           "--val-batches", "1", "--ckpt-every", "3", "--out", str(out), *extra])
    return train(config, ParallelDims(), stream=open("/dev/null", "w"))["model"]


def _generate(run: Path, ranks: int, *extra) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "lasp2.generate", "--resume", str(run), "--prompt", PROMPT, "--max-new-tokens", "12",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_generate_from_a_checkpoint_on_one_and_two_ranks(tmp_path):
    import lasp2

    model = _train(tmp_path / "run", "--linear-kind", "gated_deltanet")
    ids = torch.tensor([list(PROMPT.encode())])
    want = PROMPT + bytes(lasp2.generate(model.eval(), None, ids, 12, ragged_tail=True)[0, ids.shape[1]:].tolist()) \
        .decode("utf-8", errors="replace")
    one = _generate(tmp_path / "run", 1, "--stats")
    two = _generate(tmp_path / "run", 2)
    for done in (one, two):
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == want + "\n", (done.stdout, want)
    stats = json.loads(one.stderr.strip().splitlines()[-1])
    assert stats["ranks"] == 1 and stats["new_tokens"] == 12 and stats["checkpoint"].endswith("step_0000002")


def test_generate_from_a_hugging_face_run(tmp_path):
    pytest.importorskip("transformers")
    _train(tmp_path / "run", "--hf-config", str(ROOT / "examples" / "configs" / "qwen3_next_tiny.json"))
    one, two = _generate(tmp_path / "run", 1), _generate(tmp_path / "run", 2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[:3000], two.stderr[:6000])
    assert one.stdout == two.stdout and one.stdout.startswith(PROMPT) and len(one.stdout) > len(PROMPT)


def test_a_run_without_checkpoints_is_one_line(tmp_path):
    done = _generate(tmp_path / "nothing", 1)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"python -m lasp2.generate: --resume {tmp_path / 'nothing'}: no "
                                                   f"loadable checkpoint in {tmp_path / 'nothing' / 'checkpoints'}")
