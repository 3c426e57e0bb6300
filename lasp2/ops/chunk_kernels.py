"""The chunked linear-attention kernels, forward and backward, for a zero initial state.

Per chunk (c tokens, start state h, decays as in `ChunkedSeq`):

    o_i    = sum_{j<=i} (q_i . k_j) exp(G_i - G_j) v_j  +  (q_i * exp(G_i)) h        (intra + inter)
    h_next = exp(Gamma) * h  +  sum_j (k_j * exp(Gamma - G_j))^T v_j

The forward is split in two passes so that a sequence-parallel caller can start communicating
the final state before the (larger) output pass runs; the backward likewise. Initial and final
states of the whole sequence are handled by `boundary.py`. `do_hat` below is scale * dL/do.
Shapes: q, k [B, H, N, c, K]; v, o [B, H, N, c, V]; states [B, H, N, K, V]; g-shaped [.., c, Kg].
"""
from __future__ import annotations

import torch

from .chunk_layout import ChunkedSeq
from .gated_intra import channel_score_grads, channel_scores
from .scan import exclusive_cumsum, prefix_scan, reverse_cumsum, suffix_scan


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a [..., m, k] @ b [..., k, n] as one torch.bmm over the flattened leading dims (views,
    transposed operands included, so nothing is copied); adds into `acc` in place when given."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if acc is None:
        return torch.bmm(a3, b3).view(*a.shape[:-1], b.shape[-1])
    acc.view(-1, *acc.shape[-2:]).baddbmm_(a3, b3)
    return acc


def _crossing_sums(p: torch.Tensor) -> torch.Tensor:
    """[..., c, c] -> [..., c]: dg_t = sum_{i >= t} sum_{j < t} p[i, j], the pairs (i, j) whose
    decay includes g_t. Two small matmuls against 0/1 matrices, no cancellation."""
    c = p.shape[-1]
    r = torch.arange(c, device=p.device)
    before = (r.view(c, 1) < r.view(1, c)).to(p.dtype)  # [j, t] = j < t
    partial = p @ before  # [i, t] = sum_{j < t} p[i, j]
    return (partial * (r.view(c, 1) >= r.view(1, c))).sum(dim=-2)  # keep i >= t


def intra_scores(x: ChunkedSeq) -> torch.Tensor:
    """[B, H, N, c, c] A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i, 0 above the diagonal."""
    if not x.has_decay:
        return bmm(x.q, _t(x.k)).tril_()
    if x.scalar_decay:
        return bmm(x.q, _t(x.k)).mul_(x.intra_decay)
    return channel_scores(x.q, x.k, x.g)


def state_pass(x: ChunkedSeq):
    """-> (h_start [B, H, N, K, V]: state entering each chunk, h_end [B, H, K, V]: final state)."""
    kv = bmm(_t(x.k_to_end), x.v)
    return prefix_scan(kv, x.chunk_decay if x.has_decay else None)


def output_pass(x: ChunkedSeq, h_start: torch.Tensor, scale: float) -> torch.Tensor:
    """-> o [B, H, N, c, V] for a zero initial state, given h_start from `state_pass`."""
    o = bmm(intra_scores(x), x.v, acc=bmm(x.q_from_start, h_start))
    return o.mul_(scale) if scale != 1.0 else o


def grad_state_pass(x: ChunkedSeq, do_hat: torch.Tensor):
    """-> (delta_after [B, H, N, K, V], dh0 [B, H, K, V]).

    delta_after[n] is the gradient w.r.t. the state leaving chunk n from the outputs of later
    chunks; dh0 is the gradient w.r.t. the state entering chunk 0 (the sequence's initial state).
    """
    u = bmm(_t(x.q_from_start), do_hat)
    return suffix_scan(u, x.chunk_decay if x.has_decay else None)


def _intra_grads(x: ChunkedSeq, do_hat: torch.Tensor, dq, dk, dv):
    """Adds the intra-chunk term's gradients into dq, dk, dv; returns its dg (None: no decay)."""
    d_scores = bmm(do_hat, _t(x.v))  # dL/dA_ij before masking
    if not x.has_decay:
        scores = bmm(x.q, _t(x.k)).tril_()
        d_scores.tril_()
        bmm(d_scores, x.k, acc=dq), bmm(_t(d_scores), x.q, acc=dk), bmm(_t(scores), do_hat, acc=dv)
        return None
    if x.scalar_decay:
        d_qk = d_scores * x.intra_decay  # dL/d(q_i . k_j)
        scores = bmm(x.q, _t(x.k)).mul_(x.intra_decay)
        bmm(d_qk, x.k, acc=dq), bmm(_t(d_qk), x.q, acc=dk), bmm(_t(scores), do_hat, acc=dv)
        return _crossing_sums(d_scores.mul_(scores)).unsqueeze(-1)
    scores, dq_intra, dk_intra, dg = channel_score_grads(x.q, x.k, x.g, d_scores)
    dq += dq_intra
    dk += dk_intra
    bmm(_t(scores), do_hat, acc=dv)
    return dg


def grad_pass(x: ChunkedSeq, do_hat: torch.Tensor, h_start: torch.Tensor, delta_after: torch.Tensor):
    """-> (dq, dk, dv [B, H, N, c, D], dg [B, H, N, c, Kg] or None) for a zero initial state and
    no gradient on the final state. h_start from `state_pass`, delta_after from `grad_state_pass`.
    """
    dv = bmm(x.k_to_end, delta_after)
    if not x.has_decay:
        dq = bmm(do_hat, _t(h_start))
        dk = bmm(x.v, _t(delta_after))
        _intra_grads(x, do_hat, dq, dk, dv)
        return dq, dk, dv, None
    dq_inter = bmm(do_hat, _t(h_start)).mul_(x.exp_G)
    dk_state = bmm(x.v, _t(delta_after)).mul_(x.decay_to_end)
    # g_t decays: the start state for outputs i >= t; the keys j < t on their way to the chunk
    # end; the whole start state on its way to the next chunk; and intra pairs across t.
    dg = reverse_cumsum(x.per_decay_channel(x.q * dq_inter), dim=-2)
    dg += exclusive_cumsum(x.per_decay_channel(x.k * dk_state), dim=-2)
    carried = (x.chunk_decay.unsqueeze(-1) * h_start * delta_after).sum(dim=-1)
    dg += x.per_decay_channel(carried).unsqueeze(-2)
    dq, dk = dq_inter, dk_state
    dg += _intra_grads(x, do_hat, dq, dk, dv)
    return dq, dk, dv, dg
