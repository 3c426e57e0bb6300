"""Token files at scale: memory-mapped, never scanned whole; the vocabulary given, checked per batch."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lasp2.data import DataError, _positions_of, batch_for_step, check_ids, load_tokens


def _resident_bytes() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024


def test_a_large_token_file_is_mapped_not_read(tmp_path):
    """A 1 GiB .bin (sparse: 512M zero tokens) loads without its pages becoming resident (a scan
    for the largest id, or np.asarray of the map, would touch all of them), and a batch reads
    only its rows."""
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(2**30)
    before = _resident_bytes()
    data = load_tokens(str(path), None, 0.01, 1025, vocab_size=50304)
    rows = batch_for_step(data.train, seed=0, step=0, batch_size=4, seq_len=1024)
    grown = _resident_bytes() - before
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert len(data.train) + len(data.val) == 2**29 and data.vocab_size == 50304
    assert rows.shape == (4, 1025) and int(rows.abs().sum()) == 0
    assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MB became resident"


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_need_the_vocabulary_given(tmp_path, suffix):
    path = tmp_path / f"tokens{suffix}"
    tokens = np.arange(300, dtype=np.uint16) % 40
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    with pytest.raises(DataError, match=r"give --vocab-size \(or the --tokenizer that made it\)"):
        load_tokens(str(path), None, 0.1, 9)
    data = load_tokens(str(path), None, 0.1, 9, vocab_size=40)
    assert isinstance(data.train, np.memmap) and np.array_equal(np.concatenate([data.train, data.val]), tokens)


def test_a_batch_with_an_id_beyond_the_vocabulary_is_refused():
    rows = torch.tensor([[1, 2, 39], [0, 0, 0]])
    assert check_ids(rows, 40, "batch 3") is rows
    with pytest.raises(DataError, match=r"batch 3: token id 39 is not in \[0, 39\), the vocabulary; give --vocab-size"):
        check_ids(rows, 39, "batch 3")
    with pytest.raises(DataError, match=r"token id -2 is not in \[0, 40\)"):
        check_ids(torch.tensor([[1, -2]]), 40, "batch 0")


def test_text_vocabulary_may_grow_but_not_shrink(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    assert load_tokens(str(tmp_path / "a.txt"), None, 0.1, 9, vocab_size=512).vocab_size == 512
    with pytest.raises(DataError, match="--vocab-size 100 is smaller than the 256 ids"):
        load_tokens(str(tmp_path / "a.txt"), None, 0.1, 9, vocab_size=100)


def test_document_ends_are_found_block_by_block():
    tokens = np.array([3, 0, 1, 0, 0, 2, 5, 0, 9, 9, 0], dtype=np.uint16)
    for block in (1, 2, 3, 4, 100):
        assert _positions_of(tokens, 0, block).tolist() == np.flatnonzero(tokens == 0).tolist()
    assert _positions_of(tokens, 7, 3).tolist() == []


def test_the_trainer_takes_a_token_file_with_its_vocabulary(tmp_path):
    """A .npy corpus through lasp2.train: --vocab-size sizes the model; one too small stops the
    run at the first batch, naming the id."""
    import io

    from lasp2.distributed import ParallelDims
    from lasp2.train import parse_config, train

    np.save(tmp_path / "tokens.npy", (np.arange(4000) * 7 % 300).astype(np.int32))
    common = ["--data", str(tmp_path / "tokens.npy"), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
              "--val-batches", "1", "--ckpt-every", "0"]
    out = io.StringIO()
    result = train(parse_config([*common, "--vocab-size", "300", "--out", str(tmp_path / "a")]), ParallelDims(), out)
    assert result["model"].lm_head.out_features == 300 and len(result["losses"]) == 2
    assert "vocab 300" in out.getvalue() and "memory-mapped" in out.getvalue()
    with pytest.raises(DataError, match=r"train batch 0: token id 2\d\d is not in \[0, 200\)"):
        train(parse_config([*common, "--vocab-size", "200", "--out", str(tmp_path / "b")]), ParallelDims(), io.StringIO())
