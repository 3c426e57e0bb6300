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
    with pytest.raises(DataError, match="batch 3: token id 39 is not below the vocabulary size 39; give --vocab-size"):
        check_ids(rows, 39, "batch 3")


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
