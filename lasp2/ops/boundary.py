"""The terms a sequence's initial state S0 and final state hT add, in chunked layout.

With Ghat_i the log decay from the sequence start to token i and Ghat_T its total:

    o_i += scale * (q_i * exp(Ghat_i)) S0
    hT   = h_end + exp(Ghat_T) * S0,    h_end = sum_j (k_j * exp(Ghat_T - Ghat_j))^T v_j

These are the only places where one stretch of tokens meets the state of the tokens before or
after it, so sequence parallelism reuses them with S0 = the state gathered from earlier ranks
and dhT = the gradient gathered from later ranks. Gradients w.r.t. the per-token log decay g are
returned directly (not via a reverse cumsum of dL/dGhat), so nothing cancels.
"""
from __future__ import annotations

import torch

from .chunk_kernels import bmm
from .chunk_layout import ChunkedSeq
from .scan import exclusive_cumsum, reverse_cumsum


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, c, D] -> [B, H, N*c, D] (a view)."""
    b, h, n, c, d = x.shape
    return x.view(b, h, n * c, d)


def total_decay(x: ChunkedSeq) -> torch.Tensor | None:
    """[B, H, Kg] exp(Ghat_T): how the whole stretch scales an incoming state (None: no decay)."""
    return torch.exp(x.G_total) if x.has_decay else None


def apply_total_decay(decay: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """exp(Ghat_T) * state on the rows (key channels) of a [B, H, K, V] state."""
    return state if decay is None else decay.unsqueeze(-1) * state


def q_from_seq_start(x: ChunkedSeq) -> torch.Tensor:
    """q_i * exp(Ghat_i), [B, H, N, c, K]."""
    return x.q if not x.has_decay else x.q * torch.exp(x.G_seq)


def initial_state_output(x: ChunkedSeq, S0: torch.Tensor, scale: float) -> torch.Tensor:
    """-> [B, H, N, c, V], the output term of an initial state S0 [B, H, K, V]."""
    o = bmm(_flat(q_from_seq_start(x)), S0)
    o = o.mul_(scale) if scale != 1.0 else o
    return o.view(*x.q.shape[:-1], o.shape[-1])


def initial_state_grads(x: ChunkedSeq, do_hat: torch.Tensor, S0: torch.Tensor):
    """-> (dq [B, H, N, c, K], dg [B, H, N, c, Kg] or None) of the initial-state output term.

    (Its gradient w.r.t. S0 is the dh0 of `grad_state_pass`.)
    """
    dq = bmm(_flat(do_hat), S0.transpose(-1, -2))
    if not x.has_decay:
        return dq.view(x.q.shape), None
    dq = dq.view(x.q.shape) * torch.exp(x.G_seq)
    # g_t decays S0 for every output i >= t.
    dg = reverse_cumsum(_flat(x.per_decay_channel(x.q * dq)), dim=-2)
    return dq, dg.view(x.G_seq.shape)


def final_state_grads(x: ChunkedSeq, dhT: torch.Tensor, S0: torch.Tensor | None = None):
    """-> (dk, dv, dg or None, dS0) of hT = h_end + exp(Ghat_T) * S0, given dL/dhT [B, H, K, V]."""
    decay = None if not x.has_decay else torch.exp(x.to_seq_end)  # exp(Ghat_T - Ghat_j)
    k_to_seq_end = x.k if decay is None else x.k * decay
    dv = bmm(_flat(k_to_seq_end), dhT).view(x.v.shape)
    dk = bmm(_flat(x.v), dhT.transpose(-1, -2)).view(x.k.shape)
    dS0 = apply_total_decay(total_decay(x), dhT)
    if decay is None:
        return dk, dv, None, dS0
    dk = dk * decay
    # g_t decays every key j < t on its way to the end, and S0 across the whole stretch.
    dg = exclusive_cumsum(_flat(x.per_decay_channel(x.k * dk)), dim=-2).view(x.G_seq.shape)
    if S0 is not None:
        carried = (apply_total_decay(total_decay(x), S0) * dhT).sum(dim=-1)
        dg = dg + x.per_decay_channel(carried)[:, :, None, None, :]
    return dk, dv, dg, dS0
