"""Packed documents: FLA's `cu_seqlens` convention, checked, and what the ops make of it.

A packed row (B = 1) holds N documents back to back; `cu_seqlens` [N + 1] (int64) lists their
offsets, 0 = c_0 < c_1 < … < c_N = T, checked and read on the host once into `Documents`
(per batch: the layers then derive what they need by device ops and host arithmetic, never a
device read). Every document is computed as if alone: the recurrent state
is zero at its first token (or its own initial state). The kernels see this as one flag per
token, `resets` [T] (True at each document's first token): for linear attention a reset is a log
decay of RESET_LOG_DECAY at that token (exp of any sum that includes it is exactly 0, and the
kernels form every decay factor as exp of such a sum, never as a difference); the delta rule
masks its within-chunk terms with it.

Per-document initial and final states ([N, H, K, V], as in FLA) travel as K extra tokens per
document (`with_state_tokens`): before a document, K tokens write its initial state row by row
(k = e_i, v = row i; the delta rule with beta = 1, which overwrites row i); after it, K tokens read
its final state (q = e_i, nothing written). Exact, and differentiable by the same kernels; it
costs 2·K tokens per document, only when states are asked for.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .checks import DECAY_CHANNEL, DECAY_TOKEN

# A log decay so strong that exp of any sum including it is 0 in fp32 and fp64, yet sums of up
# to ~1e8 of them stay finite in fp32.
RESET_LOG_DECAY = -1e30


class Documents:
    """A packed row's documents, checked once (per batch, not per layer): `cu_seqlens` [N + 1]
    (int64, on the device the row computes on) and the same offsets on the host (`offsets`), so
    that the layers of a model derive everything else (resets, document ids, which keys a slot's
    queries reach) by device ops or Python arithmetic, with no host read per call. Build it with
    `documents(...)`; every op that takes `cu_seqlens` takes a tensor (read once per call) or one
    of these. Device tensors derived from it are kept (`memo`), so each is built once per batch."""

    def __init__(self, cu_seqlens: torch.Tensor, offsets: tuple):
        self.cu_seqlens, self.offsets = cu_seqlens, offsets
        self._memo: dict = {}

    def __repr__(self) -> str:
        return f"Documents({list(self.offsets)})"

    @property
    def seq_len(self) -> int:
        return self.offsets[-1]

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def memo(self, key, make):
        """make() once per key (a derived tensor of this batch), then the kept result."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def document_of(self, position: int) -> int:
        """The index of the document holding a global position (host arithmetic)."""
        return bisect.bisect_right(self.offsets, position) - 1

    def start_of(self, position: int) -> int:
        """The first position of the document holding `position`."""
        return self.offsets[self.document_of(position)]

    def starts(self, device) -> torch.Tensor:
        """[T] bool, True at each document's first token."""
        def make():
            out = torch.zeros(self.seq_len, dtype=torch.bool, device=device)
            out.index_fill_(0, self.cu_seqlens[:-1].to(device), True)
            return out
        return self.memo(("starts", str(device)), make)

    def ids(self, device) -> torch.Tensor:
        """[T] int64: the document each token belongs to."""
        return self.memo(("ids", str(device)), lambda: torch.cumsum(self.starts(device).long(), dim=0) - 1)

    def positions(self, device) -> torch.Tensor:
        """[T] int64: each token's position within its document (0 at every document's start)."""
        return self.memo(("positions", str(device)), lambda: torch.arange(self.seq_len, device=device)
                         - self.cu_seqlens.to(device)[self.ids(device)])


def documents(cu_seqlens, fn: str = "documents", seq_len: int | None = None, batch: int = 1) -> Documents:
    """cu_seqlens (a tensor, or `Documents` already checked) as `Documents`. Raises a
    ValueError/TypeError naming the rule unless it is a 1-D int64 tensor of N + 1 offsets with
    0 = c_0 < c_1 < … < c_N = seq_len (when given), and the inputs are one packed row (batch 1).
    A tensor costs one host read (its offsets); `Documents` none."""
    if batch != 1:
        raise ValueError(f"{fn}: with cu_seqlens the inputs are one packed row (B = 1), got B = {batch}")
    if isinstance(cu_seqlens, Documents):
        found = cu_seqlens
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor of int64 offsets (or lasp2 Documents), got "
                            f"{type(cu_seqlens).__name__}")
        if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{fn}: cu_seqlens must be a 1-D int64 tensor [N + 1] of document offsets, got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        offsets = tuple(cu_seqlens.tolist())
        if offsets[0] != 0:
            raise ValueError(f"{fn}: cu_seqlens must start at 0, got {offsets[0]} … {offsets[-1]}")
        if any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{fn}: cu_seqlens must be strictly increasing (no empty documents), got {list(offsets)}")
        found = Documents(cu_seqlens, offsets)
    if seq_len is not None and found.seq_len != seq_len:
        raise ValueError(f"{fn}: cu_seqlens must start at 0 and end at the packed length {seq_len}, got "
                         f"{found.offsets[0]} … {found.seq_len}")
    return found


def check_document_states(fn: str, initial_state, docs: Documents, per_document: tuple) -> None:
    """With cu_seqlens, initial_state is None or [N, *per_document] (one state per document)."""
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"{fn}: initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}")
    want = (docs.count, *per_document)
    if tuple(initial_state.shape) != want:
        raise ValueError(f"{fn}: with cu_seqlens, initial_state holds one state per document: [N, H, K, V]={want}, "
                         f"got {tuple(initial_state.shape)}")


def each_document(docs: Documents, initial_state, run):
    """Every document alone: run(span, its initial state [1, ...] or None) -> (o [B, n, ...], final
    state [1, ...]) for each span (a slice of the packed row); -> (the outputs joined along the
    row, the final states stacked [N, ...])."""
    bounds = docs.offsets
    parts = [run(slice(a, b), None if initial_state is None else initial_state[d:d + 1])
             for d, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return torch.cat([o for o, _ in parts], dim=1), torch.cat([state for _, state in parts])


def reset_log_decay(log_decay: torch.Tensor | None, kind: str, resets: torch.Tensor, num_heads: int, key_dim: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """A linear-attention log decay of any form (None, [H], [1, T, H], [1, T, H, K]) with
    RESET_LOG_DECAY at every reset [T] -> (the decay, [1, T, H] or [1, T, H, K], its form "token"
    or "channel"). Differentiable in log_decay; the gradient at a reset token is zero (its decay
    only scaled the state that the reset drops)."""
    T = resets.shape[0]
    channel = kind == DECAY_CHANNEL
    shape = (1, T, num_heads, key_dim) if channel else (1, T, num_heads)
    if log_decay is None:
        base = torch.zeros(shape, dtype=dtype, device=resets.device)
    elif log_decay.dim() == 1:
        base = log_decay.view(1, 1, num_heads).expand(shape)
    else:
        base = log_decay
    base = base.to(dtype)  # in the compute dtype: -1e30 overflows fp16 to -inf, and 0 * -inf is nan
    reset = torch.full((), RESET_LOG_DECAY, dtype=dtype, device=base.device)
    return torch.where(resets.view(1, T, *[1] * (len(shape) - 2)), reset, base), (DECAY_CHANNEL if channel else DECAY_TOKEN)


@dataclass
class StateTokens:
    """Where a row's tokens went when K state tokens were put around each document: `real` [T]
    the new index of each original token, `writes` [N, K] / `reads` [N, K] the indices of each
    document's initial-state writers and final-state readers (None when not asked for),
    `documents` of the longer row."""

    real: torch.Tensor
    writes: torch.Tensor | None
    reads: torch.Tensor | None
    documents: Documents

    @property
    def length(self) -> int:
        return self.documents.seq_len


def with_state_tokens(docs: Documents, key_dim: int, write: bool, read: bool, device) -> StateTokens:
    """The layout of a row with K writer tokens before each document (write) and K reader
    tokens after it (read); offsets on the host, indices by device arithmetic."""
    extra = key_dim * (int(write) + int(read))
    offsets = tuple(a + extra * d for d, a in enumerate(docs.offsets))  # the longer row's
    first_real = torch.tensor([a + (key_dim if write else 0) for a in offsets[:-1]], device=device)
    lengths = torch.tensor([b - a for a, b in zip(docs.offsets, docs.offsets[1:])], device=device)
    channels = torch.arange(key_dim, device=device)
    longer = Documents(torch.tensor(offsets, device=device), offsets)
    return StateTokens(
        real=torch.arange(docs.seq_len, device=device) + docs.ids(device) * extra + (key_dim if write else 0),
        writes=(longer.cu_seqlens[:-1, None] + channels) if write else None,
        reads=(first_real + lengths)[:, None] + channels if read else None,
        documents=longer,
    )


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """[1, T, ...] -> [1, length, ...] with x at `index` and zeros elsewhere (differentiable)."""
    out = x.new_zeros(1, length, *x.shape[2:])
    return out.index_copy(1, index, x)


def _unit_rows(documents: int, heads: int, key_dim: int, like: torch.Tensor) -> torch.Tensor:
    """[1, N·K, H, K]: for each document, the rows e_0 … e_{K−1} in every head."""
    eye = torch.eye(key_dim, dtype=like.dtype, device=like.device)
    return eye[None, :, None, :].expand(documents, key_dim, heads, key_dim).reshape(1, -1, heads, key_dim)


def add_state_tokens(lay: StateTokens, q, k, v, initial_state, dtype: torch.dtype):
    """q, k [1, T, Hk, K], v [1, T, H, V] -> the longer row's, in `dtype`: writers carry k = e_i
    and v = row i of their document's initial state [N, H, K, V]; readers q = e_i; everything
    else of theirs is zero."""
    n, K = lay.documents.count, q.shape[-1]
    q2, k2, v2 = (scatter_tokens(t.to(dtype), lay.real, lay.length) for t in (q, k, v))
    if lay.writes is not None:
        rows = lay.writes.flatten()
        k2 = k2.index_copy(1, rows, _unit_rows(n, k.shape[2], K, k2))
        v2 = v2.index_copy(1, rows, initial_state.to(dtype).transpose(1, 2).reshape(1, n * K, *v.shape[2:]))
    if lay.reads is not None:
        q2 = q2.index_copy(1, lay.reads.flatten(), _unit_rows(n, q.shape[2], K, q2))
    return q2, k2, v2


def read_states(o2: torch.Tensor, lay: StateTokens, scale: float) -> torch.Tensor:
    """The readers' outputs (scale · row i of each document's final state) -> [N, H, K, V]."""
    n, K = lay.reads.shape
    return (o2[0, lay.reads.flatten()] / scale).view(n, K, *o2.shape[2:]).transpose(1, 2)


def check_readable(fn: str, scale: float, output_final_state: bool) -> None:
    if output_final_state and scale == 0:
        raise ValueError(f"{fn}: per-document final states are read through the outputs, so scale must not be 0 "
                         f"with cu_seqlens and output_final_state=True")
