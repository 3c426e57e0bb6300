"""The chunked layout the kernels work in, and conversions to and from the public [B, T, H, D].

A sequence of T tokens is cut into N = ceil(T / c) chunks of c tokens; the tail is padded with
zeros (q = k = v = 0, log decay 0), which changes no output and no state. Tensors become
[B, H, N, c, D] so that every per-chunk product is one batched matmul.
"""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from .checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_NONE, DECAY_TOKEN, compute_dtype
from .scan import exclusive_cumsum, reverse_exclusive_cumsum


def to_chunks(x_BTHD: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, c, D] in `dtype`, zero-padded to N * c tokens."""
    b, t, h, d = x_BTHD.shape
    n = -(-t // chunk_size)
    x_BHTD = x_BTHD.to(dtype).transpose(1, 2)
    x_BHTD = F.pad(x_BHTD, (0, 0, 0, n * chunk_size - t)) if n * chunk_size != t else x_BHTD.contiguous()
    return x_BHTD.view(b, h, n, chunk_size, d)


def from_chunks(x_BHNCD: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, c, D] -> [B, T, H, D] in `dtype`, padding dropped."""
    b, h, n, c, d = x_BHNCD.shape
    return x_BHNCD.reshape(b, h, n * c, d)[:, :, :seq_len].transpose(1, 2).to(dtype).contiguous()


def log_decay_to_chunks(log_decay, kind: str, batch: int, seq_len: int, chunk_size: int, dtype) -> torch.Tensor:
    """Any public log-decay form -> per-token g as [B, H, N, c, Kg] (Kg = K for GLA, else 1)."""
    if kind == DECAY_HEAD:
        g_BTHK = log_decay.to(dtype).view(1, 1, -1, 1).expand(batch, seq_len, -1, 1)
    elif kind == DECAY_TOKEN:
        g_BTHK = log_decay.to(dtype).unsqueeze(-1)
    elif kind == DECAY_CHANNEL:
        g_BTHK = log_decay.to(dtype)
    else:
        raise AssertionError(kind)
    return to_chunks(g_BTHK, chunk_size, dtype)


def log_decay_grad_from_chunks(dg_BHNCK: torch.Tensor, kind: str, seq_len: int, dtype) -> torch.Tensor:
    """Gradient w.r.t. per-token g in [B, H, N, c, Kg] -> the shape log_decay was given in."""
    dg_BTHK = from_chunks(dg_BHNCK, seq_len, dg_BHNCK.dtype)
    if kind == DECAY_HEAD:
        return dg_BTHK.sum(dim=(0, 1, 3)).to(dtype)
    if kind == DECAY_TOKEN:
        return dg_BTHK.squeeze(-1).to(dtype)
    return dg_BTHK.to(dtype)


def _segment_matrix(c: int, device, dtype) -> torch.Tensor:
    """[c, c * c] 0/1 matrix: column (i, j) selects the tokens r with j < r <= i."""
    r = torch.arange(c, device=device)
    i, j = r.view(c, 1, 1), r.view(1, c, 1)
    return ((j < r) & (r <= i)).to(dtype).view(c * c, c).t()


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """[..., c, Kg] -> [..., Kg, c, c]: out[.., i, j] = sum_{j < r <= i} g_r for j <= i, -inf above.

    Summed directly (one small matmul against a 0/1 matrix) rather than as G_i - G_j, so that
    strong decay loses no precision.
    """
    c = g.shape[-2]
    sums = (g.transpose(-1, -2) @ _segment_matrix(c, g.device, g.dtype)).view(*g.shape[:-2], g.shape[-1], c, c)
    upper = torch.ones(c, c, dtype=torch.bool, device=g.device).triu(1)
    return sums.masked_fill_(upper, float("-inf"))


class ChunkedSeq:
    """One rank's (or one device's) sequence in chunked layout, with its decay factors.

    Attributes:
        q, k: [B, H, N, c, K];  v: [B, H, N, c, V]  (compute dtype: fp32, or fp64 for fp64 input)
        g: [B, H, N, c, Kg] per-token log decay, or None without decay (Kg = K for GLA, else 1).
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
        """From public [B, T, H, D] tensors and a log decay in any of its forms."""
        b, t = q.shape[:2]
        dtype = compute_dtype(q.dtype)
        g = None if kind == DECAY_NONE else log_decay_to_chunks(log_decay, kind, b, t, chunk_size, dtype)
        chunked = (to_chunks(x, chunk_size, dtype) for x in (q, k, v))
        return cls(*chunked, g, kind, t, (q.dtype, None if log_decay is None else log_decay.dtype))

    def save_for_backward(self, ctx, q, k, v, log_decay, *extra: torch.Tensor) -> None:
        """Saves on an autograd ctx what `from_ctx` needs to rebuild this sequence: the chunked
        tensors when they are the inputs' own precision (re-laying the inputs out would cost
        four copies), else the inputs; then `extra`."""
        mine = (self.q, self.k, self.v, self.g) if self.q.dtype == q.dtype else (q, k, v, log_decay)
        ctx.save_for_backward(*mine, *extra)
        ctx.chunked_seq = (self.kind, self.chunk_size, self.seq_len, self.dtypes)

    @classmethod
    def from_ctx(cls, ctx) -> tuple["ChunkedSeq", list]:
        """-> (the sequence saved by `save_for_backward`, its extra tensors)."""
        q, k, v, g, *extra = ctx.saved_tensors
        kind, chunk_size, seq_len, dtypes = ctx.chunked_seq
        if q.dim() == 5:
            return cls(q, k, v, g, kind, seq_len, dtypes), extra
        return cls.from_inputs(q, k, v, g, kind, chunk_size), extra

    def output_grad(self, do: torch.Tensor, scale: float) -> torch.Tensor:
        """dL/do [B, T, H, V] -> scale * dL/do in chunked layout (a fresh tensor)."""
        return self.chunk(do) if scale == 1.0 else self.chunk(do) * scale

    def input_grads(self, dq, dk, dv, dg) -> tuple:
        """Chunked gradients -> (dq, dk, dv, d_log_decay) in the inputs' layouts and dtypes."""
        dtype, decay_dtype = self.dtypes
        d_log_decay = None if decay_dtype is None else log_decay_grad_from_chunks(dg, self.kind, self.seq_len, decay_dtype)
        return self.unchunk(dq, dtype), self.unchunk(dk, dtype), self.unchunk(dv, dtype), d_log_decay

    def per_decay_channel(self, t: torch.Tensor) -> torch.Tensor:
        """[..., K] -> [..., Kg]: sums over key channels when the decay is one scalar per head."""
        return t.sum(dim=-1, keepdim=True) if self.scalar_decay else t

    @property
    def num_chunks(self) -> int:
        return self.q.shape[2]

    @property
    def has_decay(self) -> bool:
        return self.g is not None

    @property
    def scalar_decay(self) -> bool:
        return self.kind in (DECAY_HEAD, DECAY_TOKEN)

    @cached_property
    def G(self) -> torch.Tensor:
        """[B, H, N, c, Kg] log decay from the chunk start to each token (inclusive)."""
        return torch.cumsum(self.g, dim=-2)

    @cached_property
    def Gamma(self) -> torch.Tensor:
        """[B, H, N, Kg] log decay across each whole chunk."""
        return self.g.sum(dim=-2)

    @cached_property
    def chunk_decay(self) -> torch.Tensor:
        """[B, H, N, Kg] exp(Gamma): carries a chunk's start state to its end."""
        return torch.exp(self.Gamma)

    @cached_property
    def exp_G(self) -> torch.Tensor:
        """[B, H, N, c, Kg] exp(G_i)."""
        return torch.exp(self.G)

    @cached_property
    def q_from_start(self) -> torch.Tensor:
        """q_i * exp(G_i): a query decayed back to its chunk's start state."""
        return self.q if self.g is None else self.q * self.exp_G

    @cached_property
    def decay_to_end(self) -> torch.Tensor:
        """[B, H, N, c, Kg] exp(sum of g after token j to the chunk end)."""
        return torch.exp(reverse_exclusive_cumsum(self.g, dim=-2))

    @cached_property
    def k_to_end(self) -> torch.Tensor:
        """k_j decayed forward to its chunk's end state."""
        return self.k if self.g is None else self.k * self.decay_to_end

    @cached_property
    def intra_decay(self) -> torch.Tensor:
        """Scalar decays: [B, H, N, c, c] exp(G_i - G_j) for j <= i, zero above the diagonal.
        (Per-channel gates are handled by `gated_intra` instead.)"""
        return torch.exp_(segment_sums(self.g)).squeeze(-3)

    @cached_property
    def decay_before_chunk(self) -> torch.Tensor | None:
        """[B, H, N, Kg] exp(log decay from the stretch's start to each chunk's start); None
        without decay. Carries an incoming state to each chunk."""
        return None if self.g is None else torch.exp(exclusive_cumsum(self.Gamma, dim=2))

    @cached_property
    def decay_after_chunk(self) -> torch.Tensor | None:
        """[B, H, N, Kg] exp(log decay from each chunk's end to the stretch's end); None without
        decay. Carries the gradient on the outgoing state back to each chunk."""
        return None if self.g is None else torch.exp(reverse_exclusive_cumsum(self.Gamma, dim=2))

    @cached_property
    def total_decay(self) -> torch.Tensor | None:
        """[B, H, Kg] exp(log decay across the whole stretch): the stretch's transition; None
        without decay."""
        return None if self.g is None else torch.exp(self.Gamma.sum(dim=2))

    def unchunk(self, x_BHNCD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return from_chunks(x_BHNCD, self.seq_len, dtype)

    def chunk(self, x_BTHD: torch.Tensor) -> torch.Tensor:
        return to_chunks(x_BTHD, self.chunk_size, self.q.dtype)
