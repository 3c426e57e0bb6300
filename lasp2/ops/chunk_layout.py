"""The chunked layout the kernels work in, and conversions to and from the public [B, T, H, D].

A sequence of T tokens is cut into N = ceil(T / c) chunks of c tokens; the tail is padded with
zeros (q = k = v = 0, log decay 0), which changes no output and no state. Tensors become
[B, N, H, c, D] so that every per-chunk product is one batched matmul, and a run of chunks (all
heads) is one contiguous block both here and in [B, T, H, D].
"""
from __future__ import annotations

import torch

from .checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_NONE, DECAY_TOKEN, HALF_DTYPES, compute_dtype
from .policy import policy_for
from .scan import exclusive_cumsum, reverse_exclusive_cumsum


def to_chunks(x_BTHD: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, N, H, c, D] in `dtype`, zero-padded to N * c tokens (one copy: the
    cast and a transposition inside each chunk)."""
    b, t, h, d = x_BTHD.shape
    c = chunk_size
    full, rest = divmod(t, c)
    out = x_BTHD.new_empty(b, full + (rest > 0), h, c, d, dtype=dtype)
    if full:
        out[:, :full].copy_(x_BTHD[:, : full * c].view(b, full, c, h, d).transpose(2, 3))
    if rest:
        out[:, full].zero_()
        out[:, full, :, :rest].copy_(x_BTHD[:, full * c :].transpose(1, 2))
    return out


def log_decay_to_chunks(log_decay, kind: str, batch: int, seq_len: int, chunk_size: int, dtype) -> torch.Tensor:
    """Any public log-decay form -> per-token g as [B, N, H, c, Kg] (Kg = K for GLA, else 1)."""
    if kind == DECAY_HEAD:
        g_BTHK = log_decay.to(dtype).view(1, 1, -1, 1).expand(batch, seq_len, -1, 1)
    elif kind == DECAY_TOKEN:
        g_BTHK = log_decay.to(dtype).unsqueeze(-1)
    elif kind == DECAY_CHANNEL:
        g_BTHK = log_decay.to(dtype)
    else:
        raise AssertionError(kind)
    return to_chunks(g_BTHK, chunk_size, dtype)


def log_decay_grad_from_tokens(dg_BTHK: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """Gradient w.r.t. per-token g [B, T, H, Kg] -> the shape log_decay was given in."""
    if kind == DECAY_HEAD:
        return dg_BTHK.sum(dim=(0, 1, 3)).to(dtype)
    if kind == DECAY_TOKEN:
        return dg_BTHK.squeeze(-1).to(dtype)
    return dg_BTHK.to(dtype)


def segment_decays(g: torch.Tensor) -> torch.Tensor:
    """[..., c, 1] per-token log decays -> [..., c, c]: out[.., i, j] = exp(sum_{j < r <= i} g_r)
    for j <= i, 0 above the diagonal.

    A running product of the factors exp(g_r) down each column, not exp(G_i - G_j), so strong
    decay (even the -1e30 of a document reset) gives exact zeros and no cancellation.
    """
    c = g.shape[-2]
    r = torch.arange(c, device=g.device)
    below = r.view(c, 1) > r.view(1, c)
    factors = torch.where(below, torch.exp(g), torch.ones((), dtype=g.dtype, device=g.device))  # [i, j]: exp(g_i), i > j
    return factors.cumprod_(dim=-2).tril_()


def constant_decays(log_decay: torch.Tensor, c: int) -> torch.Tensor:
    """[..., 1, 1] one log decay per head -> [..., c, c]: exp((i - j) * log_decay) for j <= i,
    0 above the diagonal; the same for every chunk."""
    r = torch.arange(c, device=log_decay.device)
    steps = (r.view(c, 1) - r.view(1, c)).to(log_decay.dtype)
    exponent = torch.where(steps > 0, steps * log_decay, torch.zeros((), dtype=steps.dtype, device=steps.device))
    return torch.exp_(exponent).tril_()


class computed_once:
    """functools.cached_property without its lock (Python 3.11's holds an RLock, which
    torch.compile cannot trace): computed on first read, then kept in the instance."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value
        return value


class Tile:
    """A run of chunks of a `ChunkedSeq`, every head, contiguous in every [B, N, H, ...] tensor:
    a run of one batch row's chunks, or whole batch rows.

    Attributes:
        x: the run as a ChunkedSeq of views (every per-chunk decay factor works on it).
    """

    def __init__(self, seq: "ChunkedSeq", rows: slice, chunks: slice):
        self.rows, self.chunks = rows, chunks
        self._seq_len = seq.seq_len
        q, k, v, g = (None if t is None else self.of(t) for t in (seq.q, seq.k, seq.v, seq.g))
        self.x = ChunkedSeq(q, k, v, g, seq.kind, seq.seq_len, seq.dtypes)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This run's view of a [B, N, ...] tensor."""
        return t[self.rows, self.chunks]

    def put(self, dest_BTHD: torch.Tensor, src: torch.Tensor) -> None:
        """Copies the run's [b, n, H, c, D] values into their tokens of a [B, T, H, D] tensor
        (padding dropped, cast to dest's dtype)."""
        b, n, h, c, d = src.shape
        start = (self.chunks.start or 0) * c
        full, rest = divmod(min(n * c, self._seq_len - start), c)
        dest = dest_BTHD[self.rows, start:]
        if full:
            dest[:, : full * c].view(b, full, c, h, d).copy_(src[:, :full].transpose(2, 3))
        if rest:
            dest[:, full * c : full * c + rest].copy_(src[:, full, :, :rest].transpose(1, 2))


class ChunkedSeq:
    """One rank's (or one device's) sequence in chunked layout, with its decay factors.

    Attributes:
        q, k: [B, N, H, c, K];  v: [B, N, H, c, V]  (compute dtype: fp32, or fp64 for fp64 input;
            bf16/fp16 inputs stay in their dtype under a policy of half matmuls)
        g: [B, N, H, c, Kg] per-token log decay, or None without decay (Kg = K for GLA, else 1).
    Every decay factor below is exp of a sum of non-positive terms, formed as that sum and not
    as a difference of prefix sums, so strong decay gives exact zeros and never inf or nan.
    """

    def __init__(self, q, k, v, g, kind: str, seq_len: int, dtypes: tuple):
        """From tensors already in chunked layout (see `from_inputs`); dtypes = (the inputs'
        dtype, log_decay's dtype or None), the dtypes gradients are returned in."""
        self.q, self.k, self.v, self.g = q, k, v, g
        self.kind = kind
        self.seq_len = seq_len
        self.chunk_size = q.shape[3]
        self.dtypes = dtypes

    @classmethod
    def from_inputs(cls, q, k, v, log_decay, kind: str, chunk_size: int) -> "ChunkedSeq":
        """From public [B, T, H, D] tensors and a log decay in any of its forms. q, k, v are
        laid out in the compute dtype, or kept in their half dtype when the device policy runs
        half matmuls (`Policy.half_matmuls`); the decays always in the compute dtype."""
        b, t = q.shape[:2]
        dtype = compute_dtype(q.dtype)
        half = q.dtype in HALF_DTYPES and policy_for(q.device).half_matmuls
        g = None if kind == DECAY_NONE else log_decay_to_chunks(log_decay, kind, b, t, chunk_size, dtype)
        chunked = (to_chunks(x, chunk_size, x.dtype if half else dtype) for x in (q, k, v))
        return cls(*chunked, g, kind, t, (q.dtype, None if log_decay is None else log_decay.dtype))

    def save_for_backward(self, ctx, inputs: tuple, *extra: torch.Tensor | None) -> None:
        """Saves on an autograd ctx, through save_for_backward (so activation checkpointing can
        drop them), what `from_ctx` needs to rebuild this sequence: the public inputs it was
        built from (q, k, v, log_decay as given, in their dtype: no chunked fp32 copy is kept;
        the backward lays them out again, one copy that costs little next to its matmuls), then
        `extra`."""
        ctx.save_for_backward(*inputs, *extra)
        ctx.chunked_seq = (self.kind, self.chunk_size)

    @classmethod
    def from_ctx(cls, ctx, prepare=None) -> tuple["ChunkedSeq", list]:
        """-> (the sequence saved by `save_for_backward`, its extra tensors); prepare(q, k, v,
        log_decay) -> the tensors the sequence was built from, when the forward built it from
        something derived from its inputs (e.g. a rank's slots stacked into the batch)."""
        q, k, v, g, *extra = ctx.saved_tensors
        kind, chunk_size = ctx.chunked_seq
        inputs = (q, k, v, g) if prepare is None else prepare(q, k, v, g)
        return cls.from_inputs(*inputs, kind, chunk_size), extra

    def tiles(self) -> list[Tile]:
        """The sequence cut into runs of chunks of the device policy's `tile_values` (CPU: cache
        sized; one run when it is small, or always under a policy without tiles, or compiled)."""
        B, N, H, c = self.q.shape[:4]
        tile_values = policy_for(self.q.device).tile_values
        if tile_values is None or torch.compiler.is_compiling():  # compiled, a tile loop would only unroll
            return [Tile(self, slice(None), slice(None))]
        per_tile = max(1, tile_values // (H * c * max(c, self.q.shape[-1], self.v.shape[-1])))  # chunks
        if per_tile >= N:  # whole batch rows
            step = per_tile // N
            return [Tile(self, slice(b, b + step), slice(None)) for b in range(0, B, step)]
        return [Tile(self, slice(b, b + 1), slice(n, n + per_tile)) for b in range(B) for n in range(0, N, per_tile)]

    def empty_tokens(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised [B, T, H, dim] tensor for results that tiles `put` into."""
        return self.q.new_empty(self.q.shape[0], self.seq_len, self.q.shape[2], dim, dtype=dtype)

    def output_grad(self, do: torch.Tensor, scale: float) -> torch.Tensor:
        """dL/do [B, T, H, V] -> scale * dL/do in chunked layout (a fresh tensor)."""
        return self.chunk(do) if scale == 1.0 else self.chunk(do) * scale

    def log_decay_grad(self, dg_BTHK: torch.Tensor | None) -> torch.Tensor | None:
        """Gradient w.r.t. per-token g [B, T, H, Kg] -> w.r.t. log_decay as it was given."""
        decay_dtype = self.dtypes[1]
        return None if decay_dtype is None else log_decay_grad_from_tokens(dg_BTHK, self.kind, decay_dtype)

    def per_decay_channel(self, t: torch.Tensor) -> torch.Tensor:
        """[..., K] -> [..., Kg]: sums over key channels when the decay is one scalar per head."""
        return t.sum(dim=-1, keepdim=True) if self.scalar_decay else t

    @property
    def num_chunks(self) -> int:
        return self.q.shape[1]

    @property
    def has_decay(self) -> bool:
        return self.g is not None

    @property
    def scalar_decay(self) -> bool:
        return self.kind in (DECAY_HEAD, DECAY_TOKEN)

    @computed_once
    def G(self) -> torch.Tensor:
        """[B, N, H, c, Kg] log decay from the chunk start to each token (inclusive)."""
        return torch.cumsum(self.g, dim=-2)

    @computed_once
    def Gamma(self) -> torch.Tensor:
        """[B, N, H, Kg] log decay across each whole chunk."""
        return self.g.sum(dim=-2)

    @computed_once
    def chunk_decay(self) -> torch.Tensor:
        """[B, N, H, Kg] exp(Gamma): carries a chunk's start state to its end."""
        return torch.exp(self.Gamma)

    @computed_once
    def exp_G(self) -> torch.Tensor:
        """[B, N, H, c, Kg] exp(G_i)."""
        return torch.exp(self.G)

    @computed_once
    def q_from_start(self) -> torch.Tensor:
        """q_i * exp(G_i): a query decayed back to its chunk's start state (a matmul operand: in
        q's dtype)."""
        return self.q if self.g is None else (self.q * self.exp_G).to(self.q.dtype)

    @computed_once
    def decay_to_end(self) -> torch.Tensor:
        """[B, N, H, c, Kg] exp(sum of g after token j to the chunk end)."""
        return torch.exp(reverse_exclusive_cumsum(self.g, dim=-2))

    @computed_once
    def k_to_end(self) -> torch.Tensor:
        """k_j decayed forward to its chunk's end state (a matmul operand: in k's dtype)."""
        return self.k if self.g is None else (self.k * self.decay_to_end).to(self.k.dtype)

    @computed_once
    def intra_decay(self) -> torch.Tensor:
        """Scalar decays: [B, N, H, c, c] exp(G_i - G_j) for j <= i, zero above the diagonal
        ([1, 1, H, c, c] for one constant per head, the same in every chunk: padding tokens have
        q = k = 0, so their entries never count). Per-channel gates are handled by `gated_intra`."""
        if self.kind == DECAY_HEAD:
            return constant_decays(self.g[:1, :1, :, :1], self.chunk_size)
        return segment_decays(self.g)

    @computed_once
    def decay_before_chunk(self) -> torch.Tensor | None:
        """[B, N, H, Kg] exp(log decay from the stretch's start to each chunk's start); None
        without decay. Carries an incoming state to each chunk."""
        return None if self.g is None else torch.exp(exclusive_cumsum(self.Gamma, dim=1))

    @computed_once
    def decay_after_chunk(self) -> torch.Tensor | None:
        """[B, N, H, Kg] exp(log decay from each chunk's end to the stretch's end); None without
        decay. Carries the gradient on the outgoing state back to each chunk."""
        return None if self.g is None else torch.exp(reverse_exclusive_cumsum(self.Gamma, dim=1))

    @computed_once
    def total_decay(self) -> torch.Tensor | None:
        """[B, H, Kg] exp(log decay across the whole stretch): the stretch's transition; None
        without decay."""
        return None if self.g is None else torch.exp(self.Gamma.sum(dim=1))

    @property
    def state_dtype(self) -> torch.dtype:
        """The precision of states, scans and decay factors: fp32 (fp64 for fp64 inputs)."""
        return compute_dtype(self.dtypes[0])

    def chunk(self, x_BTHD: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> chunked like q, k, v (in their dtype)."""
        return to_chunks(x_BTHD, self.chunk_size, self.q.dtype)
