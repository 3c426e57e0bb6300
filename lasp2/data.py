"""Training data: a token stream, a held-out tail, and batches that depend only on (seed, step).

Sources (`--data`):
  (default)        the source files of the running Python's standard library, concatenated:
                   a real corpus on every machine, nothing to download
  a text file      or a directory of them (every file below it, sorted by path)
  a .npy file      an integer token array (np.load, memory-mapped)
  a .bin file      raw uint16 tokens (nanoGPT's format, memory-mapped)
  a .jsonl file    one record a line, each a document: {"text": ...}, or a chat {"messages":
                   [{"role": ..., "content": ...}, ...]} rendered by the tokenizer's chat template
                   (its tokenizer_config.json; "<|role|>\ncontent\n" per message without one),
                   only the assistant messages' tokens labelled (the loss is taken on them alone)
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

import json
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


def load_tokenizer(path: str | None):
    """The `tokenizers` Tokenizer of a tokenizer.json (or its directory); None for bytes."""
    if path is None:
        return None
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json there")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError(f"--tokenizer {path}: needs the 'tokenizers' package (pip install tokenizers)") from exc
    return Tokenizer.from_file(str(file))


def _encoder(tok):
    """-> (encode(bytes) -> np.ndarray, vocab size) of a loaded tokenizer (None: bytes)."""
    if tok is None:
        return (lambda data: np.frombuffer(data, dtype=np.uint8)), 256
    return (lambda data: np.asarray(tok.encode(data.decode("utf-8", errors="replace")).ids, dtype=np.int64)), tok.get_vocab_size()


def _tokenizer(path: str | None):
    """-> (encode(bytes) -> np.ndarray, vocab size)."""
    return _encoder(load_tokenizer(path))


def tokenizer_of_run(tokenizer: str | None, model_dir: str | None) -> str | None:
    """The tokenizer a run uses: --tokenizer, else a --hf-model directory's tokenizer.json, else
    None (bytes)."""
    if tokenizer is not None or model_dir is None:
        return tokenizer
    return model_dir if (Path(model_dir) / "tokenizer.json").is_file() else None


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
    train_labelled: np.ndarray | None = None  # chat data: 1 where a token is a target of the loss, else 0
    val_labelled: np.ndarray | None = None


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


def _chat_template(tokenizer: str | None):
    """render(messages, add_generation_prompt) -> str with the tokenizer directory's chat template,
    or None when it has none (transformers renders it: its Jinja conventions)."""
    if tokenizer is None or not Path(tokenizer).is_dir():
        return None
    config = Path(tokenizer) / "tokenizer_config.json"
    has = (Path(tokenizer) / "chat_template.jinja").is_file() or (
        config.is_file() and "chat_template" in json.loads(config.read_text()))
    if not has:
        return None
    try:
        from .integrations.transformers import chat_renderer
    except ImportError as exc:
        raise DataError(f"--tokenizer {tokenizer}: rendering its chat template needs transformers "
                        f"(pip install 'lasp2[hf]')") from exc
    return chat_renderer(tokenizer)


def _eos_id(tok, tokenizer: str | None) -> int | None:
    """The id in `tok` (loaded) of the eos_token a tokenizer directory's tokenizer_config.json
    names, or None."""
    if tokenizer is None or not (Path(tokenizer) / "tokenizer_config.json").is_file():
        return None
    eos = json.loads((Path(tokenizer) / "tokenizer_config.json").read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def _plain_chat(messages, prompt: bool) -> str:
    """The chat format without a template: "<|role|>\ncontent\n" per message."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if prompt else "")


def chat_segments(messages, render) -> list[tuple[str, bool]]:
    """A chat as (text, labelled) pieces that join to its rendering: each assistant message's
    own text (what the rendering adds after the prompt for it, end-of-turn marker included)
    labelled, the rest not."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:i], True)
            if not prompt.startswith(done):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            pieces.append((prompt[len(done):], False))
            done = prompt
        text = render(messages[:i + 1], False)
        if not text.startswith(done):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        pieces.append((text[len(done):], message["role"] == "assistant"))
        done = text
    return [(t, labelled) for t, labelled in pieces if t]


def _jsonl_documents(path: Path, tokenizer: str | None):
    """-> (tokens of each record, labelled mask of each or None for plain text, vocab size, eos id
    or None, what): each line's record encoded; a chat's tokens labelled where they fall in an
    assistant message. The tokenizer is read once."""
    tok = load_tokenizer(tokenizer)
    encode, vocab = _encoder(tok)
    render = _chat_template(tokenizer) or _plain_chat
    offsets = _offsets_encoder(tok)
    docs, masks, chats = [], [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append(encode(record["text"].encode()))
            masks.append(None)
            continue
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise DataError(f"{where}: a record needs a \"text\" string or \"messages\" [{{\"role\", \"content\"}}, ...]")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: a chat record without an assistant message has nothing to learn")
        try:
            segments = chat_segments(messages, render)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        tokens, labelled = offsets(segments)
        docs.append(tokens)
        masks.append(labelled)
        chats += 1
    if not docs:
        raise DataError(f"--data {path}: no records")
    return docs, masks, vocab, _eos_id(tok, tokenizer), f"{path} ({len(docs)} records, {chats} chats)"


def _offsets_encoder(tok):
    """-> encode(segments [(text, labelled)]) -> (token ids, labelled 0/1 per token) with a
    loaded tokenizer (None: bytes): the joined text tokenised at once; a token is labelled when
    its first character lies in a labelled segment (bytes: segment by segment, which is the same)."""
    if tok is None:
        def by_bytes(segments):
            parts = [np.frombuffer(t.encode(), dtype=np.uint8) for t, _ in segments]
            flags = [np.full(len(p), int(labelled), dtype=np.int8) for p, (_, labelled) in zip(parts, segments)]
            return np.concatenate(parts).astype(np.int64), np.concatenate(flags)
        return by_bytes

    def by_offsets(segments):
        text = "".join(t for t, _ in segments)
        bounds = np.cumsum([0] + [len(t) for t, _ in segments])
        flags = np.array([labelled for _, labelled in segments], dtype=np.int8)
        encoding = tok.encode(text, add_special_tokens=False)
        starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
        return np.asarray(encoding.ids, dtype=np.int64), flags[np.searchsorted(bounds, starts, "right") - 1]
    return by_offsets


def load_tokens(data: str | None, tokenizer: str | None, val_fraction: float, min_tokens: int,
                documents: bool = False, doc_sep: str | None = None, vocab_size: int | None = None) -> TokenData:
    """Read the corpus and split off the last `val_fraction` of it for validation; with
    `documents`, also find where its documents start (see the module's docstring). `vocab_size`:
    the model's vocabulary (needed for token files unless a tokenizer gives it; for text, at least
    the tokenizer's)."""
    if vocab_size is not None and vocab_size < 1:
        raise DataError(f"--vocab-size {vocab_size} must be >= 1")
    starts = end_token = labelled = None
    if data is not None and Path(data).suffix == ".jsonl":
        if not Path(data).is_file():
            raise DataError(f"--data {data}: no such file")
        pieces, masks, vocab, eos, what = _jsonl_documents(Path(data), tokenizer)
        # after each record: the tokenizer's end-of-sequence token, else a new id
        end_token = vocab if eos is None else eos
        end = np.array([end_token], dtype=np.int64)
        tokens = np.concatenate([np.concatenate([p.astype(np.int64), end]) for p in pieces])
        starts = np.concatenate([[0], np.cumsum([len(p) + 1 for p in pieces])[:-1]])
        if any(m is not None for m in masks):  # text records: every token a target; the end token none
            labelled = np.concatenate([np.concatenate([np.ones(len(p), np.int8) if m is None else m, [0]])
                                       for p, m in zip(pieces, masks)]).astype(np.int8)
        vocab = vocab + (eos is None)
        if vocab_size is not None:
            if vocab_size < vocab:
                raise DataError(f"--vocab-size {vocab_size} is smaller than the {vocab} ids the data's tokens take")
            vocab = vocab_size
        if not documents:
            starts = end_token = None
    elif data is not None and Path(data).suffix in (".npy", ".bin"):
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
    if labelled is not None:
        out.train_labelled, out.val_labelled = labelled[:split], labelled[split:]
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
