"""Training data: a token stream, a held-out tail, and batches that depend only on (seed, step).

Sources (`--data`):
  (default)        the source files of the running Python's standard library, concatenated:
                   a real corpus on every machine, nothing to download
  a text file      or a directory of them (every file below it, sorted by path)
  a .npy file      an integer token array (np.load, memory-mapped)
  a .bin file      raw uint16 tokens (nanoGPT's format)
Text is tokenised as bytes (vocab 256) unless `--tokenizer` names a local `tokenizers` JSON
file (or a directory holding tokenizer.json).
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
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str


def load_tokens(data: str | None, tokenizer: str | None, val_fraction: float, min_tokens: int) -> TokenData:
    """Read the corpus and split off the last `val_fraction` of it for validation."""
    if data is not None and Path(data).suffix in (".npy", ".bin"):
        if not Path(data).is_file():
            raise DataError(f"--data {data}: no such file")
        tokens = np.load(data, mmap_mode="r") if data.endswith(".npy") else np.memmap(data, dtype=np.uint16, mode="r")
        vocab, what = int(tokens.max()) + 1, f"{data} (pre-tokenised)"
    else:
        files = stdlib_files() if data is None else None
        if files is None:
            if not Path(data).exists():
                raise DataError(f"--data {data}: no such file or directory")
            files = _text_files(Path(data))
        encode, vocab = _tokenizer(tokenizer)
        tokens = encode(b"".join(f.read_bytes() for f in files))
        what = f"{'the Python standard library' if data is None else data} ({len(files)} files)"
    n_val = max(min_tokens, int(len(tokens) * val_fraction))
    if len(tokens) < n_val + min_tokens:
        raise DataError(f"--data {data}: {len(tokens)} tokens, too few for sequences of {min_tokens - 1} "
                        f"plus a validation split")
    return TokenData(np.asarray(tokens[:-n_val]), np.asarray(tokens[-n_val:]), vocab, what)


def batch_for_step(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] token windows at offsets drawn from (seed, step) alone, so a run
    resumed at `step` sees exactly the batches it would have seen."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))
