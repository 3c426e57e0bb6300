"""The chunked linear-attention kernels, forward and backward.

Per chunk (c tokens, start state h, decays as in `ChunkedSeq`):

    o_i    = sum_{j<=i} (q_i . k_j) exp(G_i - G_j) v_j  +  (q_i * exp(G_i)) h        (intra + inter)
    h_next = exp(Gamma) * h  +  sum_j (k_j * exp(Gamma - G_j))^T v_j

Every pass is split at the one place where the state entering the stretch (S_in) or the
gradient leaving it (dS_out) comes in, so that a sequence-parallel caller can run everything
that does not need them while they travel, then fold them in with one cheap element-wise step:

    forward:  state_pass (zero S_in) -> [exchange] -> add_incoming -> intra_output + inter_output
    backward: grad_state_pass (zero dS_out) -> [exchange] -> add_outgoing_grad; meanwhile
              query_side_grads; then key_side_grads

The forward keeps every chunk's start state for the backward (the size of one [B, T, H, 64]
tensor at c = K = V = 64) rather than recomputing it. The per-chunk steps run tile by tile
(`tiled_*` below, `ChunkedSeq.tiles`): a block of chunks goes through all its matmuls and
element-wise steps while it is in cache, and its results go straight to the [B, T, H, D] layout.

On one device the exchange is just the given initial state and final-state gradient, so the op
and every sequence-parallel method run the same kernels and the same number of matmuls.
`do_hat` below is scale * dL/do. Shapes: q, k [B, N, H, c, K]; v, o [B, N, H, c, V]; states
[B, N, H, K, V] per chunk or [B, H, K, V] for the stretch; g-shaped [.., c, Kg].
"""
from __future__ import annotations

import torch

from .checks import HALF_DTYPES
from .chunk_layout import ChunkedSeq
from .gated_intra import channel_score_grads, channel_scores
from .scan import exclusive_cumsum, prefix_scan, reverse_cumsum, suffix_scan


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _half_operands(a3: torch.Tensor, b3: torch.Tensor):
    """(a, b, half dtype or None): a matmul with a half operand runs with both operands in that
    dtype (the other rounded to it) and fp32 accumulation."""
    half = a3.dtype if a3.dtype in HALF_DTYPES else b3.dtype if b3.dtype in HALF_DTYPES else None
    if half is None:
        return a3, b3, None
    return a3.to(half), b3.to(half), half


def _bmm3(a3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """torch.bmm with half operands -> an fp32 result (CUDA: one tensor-core kernel with fp32
    accumulation; elsewhere the same numbers: the half operands multiplied in fp32)."""
    a3, b3, half = _half_operands(a3, b3)
    if half is None:
        return torch.bmm(a3, b3)
    if a3.is_cuda:
        return torch.bmm(a3, b3, out_dtype=torch.float32)
    return torch.bmm(a3.float(), b3.float())


def bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """a [..., m, k] @ b [..., k, n] as one torch.bmm over the flattened leading dims (views,
    transposed operands included, so nothing is copied); adds alpha times it into `acc` in
    place when given. Half operands (the CUDA policy's chunks of bf16 inputs): half matmul,
    fp32 result."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if acc is None:
        return _bmm3(a3, b3).view(*a.shape[:-1], b.shape[-1])
    if a3.dtype in HALF_DTYPES or b3.dtype in HALF_DTYPES:
        acc.view(-1, *acc.shape[-2:]).add_(_bmm3(a3, b3), alpha=alpha)
    else:
        acc.view(-1, *acc.shape[-2:]).baddbmm_(a3, b3, alpha=alpha)
    return acc


def bmm_plus(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, beta: float = 1.0):
    """beta · c + alpha · (a @ b) into a new tensor, as one torch.baddbmm (shapes as for `bmm`)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if a3.dtype in HALF_DTYPES or b3.dtype in HALF_DTYPES:
        return torch.add(c.reshape(-1, *c.shape[-2:]) * beta, _bmm3(a3, b3), alpha=alpha).view(*a.shape[:-1], b.shape[-1])
    return torch.baddbmm(c.reshape(-1, *c.shape[-2:]), a3, b3, alpha=alpha, beta=beta).view(*a.shape[:-1], b.shape[-1])


def _crossing_sums(p: torch.Tensor) -> torch.Tensor:
    """[..., c, c] -> [..., c]: dg_t = sum_{i >= t} sum_{j < t} p[i, j], the pairs (i, j) whose
    decay includes g_t. Running sums along each row, then column sums: no cancellation."""
    partial = p.cumsum(dim=-1).tril_(-1)  # [i, s] = sum_{j <= s} p[i, j], kept for i > s
    out = p.new_zeros(p.shape[:-1])
    out[..., 1:] = partial[..., :-1].sum(dim=-2)  # t = s + 1: rows i >= t
    return out


def _rows_scaled(decay: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """decay [..., Kg] * state [..., K, V] on the rows (key channels); decay None means 1."""
    return state if decay is None else decay.unsqueeze(-1) * state


def intra_scores(x: ChunkedSeq) -> torch.Tensor:
    """[B, N, H, c, c] A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i, 0 above the diagonal."""
    if not x.has_decay:
        return bmm(x.q, _t(x.k)).tril_()
    if x.scalar_decay:
        return bmm(x.q, _t(x.k)).mul_(x.intra_decay)
    return channel_scores(x.q, x.k, x.g)


def state_pass(x: ChunkedSeq):
    """-> (h_start [B, N, H, K, V]: the state entering each chunk, h_end [B, H, K, V]: the state
    leaving the stretch), both for a zero incoming state."""
    kv = bmm(_t(x.k_to_end), x.v)
    return prefix_scan(kv, x.chunk_decay if x.has_decay else None, dim=-4)


def add_incoming(x: ChunkedSeq, h_start: torch.Tensor, h_end: torch.Tensor | None, S_in: torch.Tensor):
    """Folds a state S_in [B, H, K, V] entering the stretch into `state_pass`'s results: each
    chunk's start state gains S_in decayed to it, the end state S_in decayed across the stretch.
    -> (h_start, h_end); h_end may be None when not needed."""
    h_start = h_start + _rows_scaled(x.decay_before_chunk, S_in.unsqueeze(1))
    if h_end is not None:
        h_end = h_end + _rows_scaled(x.total_decay, S_in)
    return h_start, h_end


def intra_output(x: ChunkedSeq) -> torch.Tensor:
    """-> o [B, N, H, c, V], unscaled: each token's output from the tokens of its own chunk."""
    return bmm(intra_scores(x), x.v)


def add_inter_output(x: ChunkedSeq, o: torch.Tensor, h_start: torch.Tensor, scale: float) -> torch.Tensor:
    """o += (q_i * exp(G_i)) h_start of its chunk, in place; then scales. -> the output."""
    o = bmm(x.q_from_start, h_start, acc=o)
    return o.mul_(scale) if scale != 1.0 else o


def grad_state_pass(x: ChunkedSeq, do_hat: torch.Tensor):
    """-> (delta_after [B, N, H, K, V], dS_in [B, H, K, V]) for a zero gradient on the state
    leaving the stretch.

    delta_after[n] is the gradient w.r.t. the state leaving chunk n from the outputs of later
    chunks; dS_in the gradient w.r.t. the state entering the stretch (its initial state).
    """
    u = bmm(_t(x.q_from_start), do_hat)
    return suffix_scan(u, x.chunk_decay if x.has_decay else None, dim=-4)


def add_outgoing_grad(x: ChunkedSeq, delta_after: torch.Tensor, dS_in: torch.Tensor | None, dS_out: torch.Tensor):
    """Folds a gradient dS_out [B, H, K, V] on the state leaving the stretch into
    `grad_state_pass`'s results. -> (delta_after, dS_in); dS_in may be None when not needed."""
    delta_after = delta_after + _rows_scaled(x.decay_after_chunk, dS_out.unsqueeze(1))
    if dS_in is not None:
        dS_in = dS_in + _rows_scaled(x.total_decay, dS_out)
    return delta_after, dS_in


def _intra_grads(x: ChunkedSeq, do_hat: torch.Tensor):
    """-> (dq, dk, dv, dg or None) of the intra-chunk term (its scores recomputed)."""
    d_scores = bmm(do_hat, _t(x.v))  # dL/dA_ij before masking
    if not x.has_decay:
        d_scores.tril_()
        dv = bmm(_t(bmm(x.q, _t(x.k)).tril_()), do_hat)
        return bmm(d_scores, x.k), bmm(_t(d_scores), x.q), dv, None
    if x.scalar_decay:
        qk = bmm(x.q, _t(x.k))
        dv = bmm(_t(qk * x.intra_decay), do_hat)
        d_qk = d_scores.mul_(x.intra_decay)  # dL/d(q_i . k_j)
        dq, dk = bmm(d_qk, x.k), bmm(_t(d_qk), x.q)
        return dq, dk, dv, _crossing_sums(d_qk.mul_(qk)).unsqueeze(-1)
    scores, dq, dk, dg = channel_score_grads(x.q, x.k, x.g, d_scores)
    return dq, dk, bmm(_t(scores), do_hat), dg


def query_side_grads(x: ChunkedSeq, do_hat: torch.Tensor, h_start: torch.Tensor):
    """-> (dq, dk, dv [B, N, H, c, D], dg [B, N, H, c, Kg] or None): every gradient of the
    outputs that does not need the gradient arriving from later chunks (the intra-chunk term,
    and the inter-chunk term through q and the decays of its start state). h_start: every
    chunk's start state, the incoming state folded in."""
    dq, dk, dv, dg = _intra_grads(x, do_hat)
    if not x.has_decay:
        bmm(do_hat, _t(h_start), acc=dq)
        return dq, dk, dv, dg
    dq_inter = bmm(do_hat, _t(h_start)).mul_(x.exp_G)
    dq += dq_inter
    dg += reverse_cumsum(x.per_decay_channel(x.q * dq_inter), dim=-2)  # g_t decays h for outputs i >= t
    return dq, dk, dv, dg


def key_side_grads(x: ChunkedSeq, h_start: torch.Tensor, delta_after: torch.Tensor, dq, dk, dv, dg):
    """Adds the gradients that flow through the chunk states (k, v and the decays on the way to
    each chunk's end) into `query_side_grads`' results. delta_after: the gradient leaving each
    chunk, the outgoing gradient folded in. -> (dq, dk, dv, dg)."""
    bmm(x.k_to_end, delta_after, acc=dv)
    if not x.has_decay:
        bmm(x.v, _t(delta_after), acc=dk)
        return dq, dk, dv, dg
    dk_state = bmm(x.v, _t(delta_after)).mul_(x.decay_to_end)
    dk += dk_state
    # g_t decays the keys j < t on their way to the chunk end, and the whole start state on its
    # way to the next chunk.
    dg += exclusive_cumsum(x.per_decay_channel(x.k * dk_state), dim=-2)
    carried = (x.chunk_decay.unsqueeze(-1) * h_start * delta_after).sum(dim=-1)
    dg += x.per_decay_channel(carried).unsqueeze(-2)
    return dq, dk, dv, dg


def tiled_outputs(x: ChunkedSeq, tiles, h_start: torch.Tensor, scale: float, intra=()) -> torch.Tensor:
    """-> o [B, T, H, V] in the inputs' dtype: each tile's intra output plus its inter-chunk term
    from h_start, scaled. intra: `intra_output` of the first len(intra) tiles, computed earlier
    (while the states travelled); the other tiles' are computed here, in the same pass."""
    o = x.empty_tokens(x.v.shape[-1], x.dtypes[0])
    for n, tile in enumerate(tiles):
        o_intra = intra[n] if n < len(intra) else intra_output(tile.x)
        tile.put(o, add_inter_output(tile.x, o_intra, tile.of(h_start), scale))
    return o


def tiled_input_grads(x: ChunkedSeq, tiles, h_start: torch.Tensor, delta_after: torch.Tensor, do_hat: torch.Tensor,
                      query_side=()) -> tuple:
    """-> (dq, dk, dv, d_log_decay) in the inputs' layouts and dtypes: each tile's query-side
    gradients plus its key side. query_side: `query_side_grads` of the first len(query_side)
    tiles, computed earlier (while the gradients travelled); the others' are computed here."""
    dtype = x.dtypes[0]
    dq, dk = x.empty_tokens(x.q.shape[-1], dtype), x.empty_tokens(x.k.shape[-1], dtype)
    dv = x.empty_tokens(x.v.shape[-1], dtype)
    dg = None if x.g is None else x.empty_tokens(x.g.shape[-1], x.g.dtype)
    for n, tile in enumerate(tiles):
        grads = query_side[n] if n < len(query_side) else query_side_grads(tile.x, tile.of(do_hat), tile.of(h_start))
        grads = key_side_grads(tile.x, tile.of(h_start), tile.of(delta_after), *grads)
        for dest, grad in zip((dq, dk, dv, dg), grads):
            if dest is not None:
                tile.put(dest, grad)
    return dq, dk, dv, x.log_decay_grad(dg)
