"""Training data: a token stream, a held-out tail, and batches that depend only on (seed, step).

Sources (`--data`):
  (default)        the source files of the running Python's standard library, concatenated:
                   a real corpus on every machine, nothing to download
  a text file      or a directory of them (every file below it, sorted by path)
  a .npy file      an integer token array (np.load, memory-mapped)
  a .bin file      raw uint16 tokens (nanoGPT's format, memory-mapped)
Text is tokenised as bytes (vocab 256) unless `--tokenizer` names a local `tokenizers` JSON
file (or a directory holding tokenizer.json). Token files stay on disk: batches read their rows
from the memory map and nothing reads the whole file (except packing, which finds the document
ends once, a block at a time), so the vocabulary comes from `--vocab-size` or the tokenizer (a
batch holding an id outside it is refused when it is drawn).

Packing (`--packing documents`): the corpus is a sequence of documents (each text file, or the
pieces between `--doc-sep` strings; in a .npy/.bin corpus the token id `--doc-sep` ends each),
each followed by an end-of-document token (text: a new id, the vocabulary grows by one). A row
starts at a document's start and takes whole documents in order, the last one cut at the row's
end; its `cu_seqlens` mark where documents begin.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A data or tokenizer problem, reported with the flag it concerns."""


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def _tokenizer(path: str | None):
    """-> (encode(bytes) -> np.ndarray, vocab size)."""
    if path is None:
        return (lambda data: np.frombuffer(data, dtype=np.uint8)), 256
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json there")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError(f"--tokenizer {path}: needs the 'tokenizers' package (pip install tokenizers)") from exc
    tok = Tokenizer.from_file(str(file))
    return (lambda data: np.asarray(tok.encode(data.decode("utf-8", errors="replace")).ids, dtype=np.int64)), tok.get_vocab_size()


@dataclass
class TokenData:
    """The token stream split into train and validation; with packing, where each part's
    documents start (int64 offsets, 0 first)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str
    train_starts: np.ndarray | None = None
    val_starts: np.ndarray | None = None
    end_token: int | None = None  # the end-of-document token


def _separator(doc_sep: str) -> bytes:
    """--doc-sep as bytes, backslash escapes read ("\\n\\n" on a command line: two newlines)."""
    try:
        sep = doc_sep.encode("latin-1", "backslashreplace").decode("unicode_escape").encode()
    except UnicodeDecodeError as exc:
        raise DataError(f"--doc-sep {doc_sep!r}: not a valid escaped string ({exc.reason})") from None
    if not sep:
        raise DataError("--doc-sep '': the separator between documents must not be empty")
    return sep


def _documents_of_text(files, doc_sep: str | None) -> list[bytes]:
    if doc_sep is None:
        return [f.read_bytes() for f in files]
    sep = _separator(doc_sep)
    return [piece for f in files for piece in f.read_bytes().split(sep)]


def _token_file_vocab(data: str, tokenizer: str | None, vocab_size: int | None) -> int:
    if vocab_size is not None:
        return vocab_size
    if tokenizer is not None:
        return _tokenizer(tokenizer)[1]
    raise DataError(f"--data {data}: give --vocab-size (or the --tokenizer that made it); a token file's vocabulary "
                    f"is not found by scanning every token")


def _positions_of(tokens: np.ndarray, token: int, block: int = 1 << 24) -> np.ndarray:
    """Where `token` occurs in a (memory-mapped) array, read a block at a time."""
    return np.concatenate([np.flatnonzero(tokens[i:i + block] == token) + i for i in range(0, len(tokens), block)]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def load_tokens(data: str | None, tokenizer: str | None, val_fraction: float, min_tokens: int,
                documents: bool = False, doc_sep: str | None = None, vocab_size: int | None = None) -> TokenData:
    """Read the corpus and split off the last `val_fraction` of it for validation; with
    `documents`, also find where its documents start (see the module's docstring). `vocab_size`:
    the model's vocabulary (needed for token files unless a tokenizer gives it; for text, at least
    the tokenizer's)."""
    if vocab_size is not None and vocab_size < 1:
        raise DataError(f"--vocab-size {vocab_size} must be >= 1")
    starts = end_token = None
    if data is not None and Path(data).suffix in (".npy", ".bin"):
        if not Path(data).is_file():
            raise DataError(f"--data {data}: no such file")
        tokens = np.load(data, mmap_mode="r") if data.endswith(".npy") else np.memmap(data, dtype=np.uint16, mode="r")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"--data {data}: a token file holds one array of integer ids, got {tokens.dtype} "
                            f"of shape {tokens.shape}")
        vocab, what = _token_file_vocab(data, tokenizer, vocab_size), f"{data} (pre-tokenised, memory-mapped)"
        if documents:
            if doc_sep is None or not doc_sep.isdigit():
                raise DataError(f"--packing documents with --data {data}: give --doc-sep the token id that ends "
                                f"each document, got {doc_sep!r}")
            ends = _positions_of(tokens, int(doc_sep)) + 1
            if len(ends) == 0:
                raise DataError(f"--doc-sep {doc_sep}: token id {doc_sep} never occurs in --data {data}")
            starts, end_token = np.concatenate([[0], ends[ends < len(tokens)]]), int(doc_sep)
    else:
        files = stdlib_files() if data is None else None
        if files is None:
            if not Path(data).exists():
                raise DataError(f"--data {data}: no such file or directory")
            files = _text_files(Path(data))
        encode, vocab = _tokenizer(tokenizer)
        what = f"{'the Python standard library' if data is None else data} ({len(files)} files)"
        if documents:  # each document, then the end-of-document token (a new id)
            pieces = [encode(doc) for doc in _documents_of_text(files, doc_sep)]
            end, end_token = np.array([vocab], dtype=np.int64), vocab
            tokens = np.concatenate([np.concatenate([p.astype(np.int64), end]) for p in pieces])
            starts = np.concatenate([[0], np.cumsum([len(p) + 1 for p in pieces])[:-1]])
            vocab, what = vocab + 1, f"{what}, {len(pieces)} documents"
        else:
            tokens = encode(b"".join(f.read_bytes() for f in files))
        if vocab_size is not None:
            if vocab_size < vocab:
                raise DataError(f"--vocab-size {vocab_size} is smaller than the {vocab} ids the data's tokens take")
            vocab = vocab_size
    n_val = max(min_tokens, int(len(tokens) * val_fraction))
    if len(tokens) < n_val + min_tokens:
        raise DataError(f"--data {data}: {len(tokens)} tokens, too few for sequences of {min_tokens - 1} "
                        f"plus a validation split")
    split = len(tokens) - n_val
    out = TokenData(tokens[:split], tokens[split:], vocab, what)  # views: a memory map stays one
    if starts is not None:  # the validation part begins wherever the split falls: a start there too
        out.train_starts = starts[starts < split].astype(np.int64)
        out.val_starts = np.concatenate([[0], starts[starts > split] - split]).astype(np.int64)
        out.end_token = end_token
    return out


def packed_batch_for_step(tokens: np.ndarray, starts: np.ndarray, seed: int, step: int, batch_size: int,
                          seq_len: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[batch_size, seq_len + 1] rows that each begin at a document drawn from (seed, step)
    alone, and each row's cu_seqlens over its seq_len input positions."""
    candidates = starts[starts <= len(tokens) - seq_len - 1]
    if len(candidates) == 0:
        raise DataError(f"--packing documents: no document starts {seq_len + 1} tokens before the end of the data")
    rng = np.random.default_rng([seed, step])
    rows, offsets = [], []
    for s in candidates[rng.integers(0, len(candidates), size=batch_size)]:
        rows.append(tokens[s:s + seq_len + 1].astype(np.int64))
        inside = starts[np.searchsorted(starts, s, "right"):np.searchsorted(starts, s + seq_len, "left")] - s
        offsets.append(torch.from_numpy(np.concatenate([[0], inside, [seq_len]]).astype(np.int64)))
    return torch.from_numpy(np.stack(rows)), offsets


def batch_for_step(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] token windows at offsets drawn from (seed, step) alone, so a run
    resumed at `step` sees exactly the batches it would have seen."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))


def check_ids(rows: torch.Tensor, vocab_size: int, what: str) -> torch.Tensor:
    """`rows` unchanged, or a DataError if an id is not below `vocab_size` (a token file's
    vocabulary is given, not scanned, so each batch is checked as it is drawn)."""
    low, top = int(rows.min()), int(rows.max())
    if low < 0 or top >= vocab_size:
        raise DataError(f"{what}: token id {low if low < 0 else top} is not in [0, {vocab_size}), the vocabulary; "
                        f"give --vocab-size (or --tokenizer) for this corpus")
    return rows
