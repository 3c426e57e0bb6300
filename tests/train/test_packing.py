"""Packed documents in the trainer's data: where documents start, rows of whole documents
drawn from (seed, step) alone, their cu_seqlens, and the flags' errors."""
import numpy as np
import pytest
import torch

from lasp2.data import DataError, load_tokens, packed_batch_for_step


@pytest.fixture
def corpus(tmp_path):
    texts = ["alpha beta", "gamma", "", "delta epsilon zeta eta", "theta"] * 40
    for i, text in enumerate(texts):
        (tmp_path / f"{i:03d}.txt").write_text(text)
    return tmp_path, texts


def test_each_file_is_a_document_ended_by_a_new_token(corpus):
    root, texts = corpus
    data = load_tokens(str(root), None, 0.1, 17, documents=True)
    assert data.vocab_size == 257  # bytes and the end-of-document token
    whole = np.concatenate([data.train, data.val])
    starts = data.train_starts
    assert starts[0] == 0 and all(whole[s - 1] == 256 for s in starts[1:])
    assert (whole == 256).sum() == len(texts)
    lengths = np.diff(starts)  # the whole documents of the train part, files in name order
    assert list(lengths[:5]) == [len(t) + 1 for t in texts[:5]]
    assert data.val_starts[0] == 0 and all(data.val[s - 1] == 256 for s in data.val_starts[1:])


def test_rows_start_at_documents_and_mark_where_the_others_begin(corpus):
    data = load_tokens(str(corpus[0]), None, 0.1, 17, documents=True)
    rows, offsets = packed_batch_for_step(data.train, data.train_starts, seed=3, step=7, batch_size=4, seq_len=16)
    again, offsets_again = packed_batch_for_step(data.train, data.train_starts, seed=3, step=7, batch_size=4, seq_len=16)
    assert torch.equal(rows, again) and all(torch.equal(a, b) for a, b in zip(offsets, offsets_again))
    assert rows.shape == (4, 17)
    for row, cu in zip(rows, offsets):
        assert cu[0] == 0 and cu[-1] == 16 and bool((cu[1:] > cu[:-1]).all())
        inner = cu[1:-1]
        assert all(row[int(c) - 1] == 256 for c in inner)  # each inner document follows an end token
        assert int((row[:16] == 256).sum()) == len(inner)  # and no other end token precedes an input
    other, _ = packed_batch_for_step(data.train, data.train_starts, seed=3, step=8, batch_size=4, seq_len=16)
    assert not torch.equal(rows, other)


def test_pre_tokenised_corpus_ends_documents_at_the_given_id(tmp_path):
    tokens = np.array([5, 6, 0, 7, 0, 8, 9, 10, 0, 11] * 20, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = load_tokens(str(path), None, 0.1, 5, documents=True, doc_sep="0", vocab_size=12)
    assert data.vocab_size == 12 and data.train_starts[:4].tolist() == [0, 3, 5, 9]
    with pytest.raises(DataError, match="--doc-sep the token id"):
        load_tokens(str(path), None, 0.1, 5, documents=True, vocab_size=12)


def test_text_documents_split_at_doc_sep(tmp_path):
    (tmp_path / "all.txt").write_text("one\n\ntwo words\n\nthree" * 10)
    data = load_tokens(str(tmp_path / "all.txt"), None, 0.1, 5, documents=True, doc_sep="\\n\\n")
    whole = np.concatenate([data.train, data.val])
    assert (whole == 256).sum() == 21  # "three" and "one" of the next repeat join: 2 per repeat + the last


def test_a_row_ending_at_a_document_end_skips_its_last_label(tmp_path):
    """Four documents of three bytes (four tokens with the end token), rows of 4: every row ends
    with an end token whose label is the next document's first token: skipped."""
    from lasp2.run_config import DataChoice
    from lasp2.train import make_batch

    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text("abc")
    data = load_tokens(str(tmp_path), None, 0.25, 5, documents=True)
    rows, documents, skip = make_batch(data, "train", 0, 0, DataChoice(packing="documents", batch_size=3, seq_len=4))
    assert all(cu.tolist() == [0, 4] for cu in documents)
    assert skip[:, -1].all() and not skip[:, :-1].any() and (rows[:, 3] == data.end_token).all()


@pytest.mark.parametrize("doc_sep,message", [("", "must not be empty"), ("\\", "not a valid escaped string")])
def test_bad_doc_sep_is_a_data_error(tmp_path, doc_sep, message):
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=message):
        load_tokens(str(tmp_path / "a.txt"), None, 0.1, 5, documents=True, doc_sep=doc_sep)


def test_non_ascii_doc_sep_splits(tmp_path):
    (tmp_path / "a.txt").write_text("one§two§three" * 10, encoding="utf-8")
    data = load_tokens(str(tmp_path / "a.txt"), None, 0.1, 5, documents=True, doc_sep="§")
    assert (np.concatenate([data.train, data.val]) == 256).sum() == 21
