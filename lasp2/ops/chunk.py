"""Chunked linear attention on one device: the public op and its hand-written autograd."""
from __future__ import annotations

import torch

from .bidirectional import bidirectional_linear_attn
from .checks import DECAY_CHANNEL, check_chunk_size, check_linear_attn_inputs
from .chunk_kernels import (add_incoming, add_inter_output, add_outgoing_grad, grad_state_pass, intra_output,
                            key_side_grads, query_side_grads, state_pass)
from .chunk_layout import ChunkedSeq
from .precision import without_autocast


def effective_chunk_size(chunk_size, kind: str, fn: str) -> int:
    """The chunk length used: `chunk_size`, except that per-channel (GLA) decay, whose
    intra-chunk term is built by binary splitting, rounds it down to a power of two."""
    check_chunk_size(chunk_size, fn)
    return 1 << (chunk_size.bit_length() - 1) if kind == DECAY_CHANNEL else chunk_size


class _ChunkLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, kind, scale, chunk_size):
        ctx.set_materialize_grads(False)
        x = ChunkedSeq.from_inputs(q, k, v, log_decay, kind, chunk_size)
        S0 = None if initial_state is None else initial_state.to(x.q.dtype)
        h_start, final_state = state_pass(x)
        if S0 is not None:
            h_start, final_state = add_incoming(x, h_start, final_state, S0)
        o = add_inter_output(x, intra_output(x), h_start, scale)
        x.save_for_backward(ctx, q, k, v, log_decay, initial_state)
        ctx.scale = scale
        return x.unchunk(o, q.dtype), final_state

    @staticmethod
    @without_autocast
    def backward(ctx, do, d_final):
        if do is None and d_final is None:
            return (None,) * 8
        x, (initial_state,) = ChunkedSeq.from_ctx(ctx)
        do_hat = x.output_grad(do, ctx.scale) if do is not None else x.v.new_zeros(x.v.shape)
        delta_after, dS0 = grad_state_pass(x, do_hat)
        if d_final is not None:
            delta_after, dS0 = add_outgoing_grad(x, delta_after, dS0, d_final.to(x.q.dtype))
        h_start, _ = state_pass(x)
        if initial_state is not None:
            h_start, _ = add_incoming(x, h_start, None, initial_state.to(x.q.dtype))
        grads = key_side_grads(x, h_start, delta_after, *query_side_grads(x, do_hat, h_start))
        dS0 = None if initial_state is None else dS0.to(initial_state.dtype)
        return (*x.input_grads(*grads), dS0, None, None, None)


@without_autocast
def chunk_linear_attn(
    q,
    k,
    v,
    log_decay=None,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    causal=True,
    chunk_size=64,
    validate=False,
):
    """Linear attention in the chunked parallel form; differentiable in every tensor input.

    Computes o_n = scale * q_n S_n with S_n = diag(exp(g_n)) S_{n-1} + k_n^T v_n (causal), or
    o_n = scale * q_n (S_0 + sum_m k_m^T v_m) (causal=False), for T tokens of B x H heads.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values (V may differ from K).
        log_decay: log of the decay, every value <= 0. None (basic linear attention);
            [H] (one constant per head: Lightning, Retention); [B, T, H] (data dependent per
            head and token: SimpleGLA, Mamba2-style); [B, T, H, K] (per key channel: GLA).
        scale: multiplies every output; None means 1, the paper's unnormalised form (pass
            K ** -0.5 for the softmax-style scaling).
        initial_state: [B, H, K, V] state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        causal: False gives the bidirectional form (only with log_decay=None).
        chunk_size: tokens per chunk (T need not be a multiple). Per-channel decay rounds it
            down to a power of two (its intra-chunk term is built by binary splitting).
        validate: also check the values, not only the shapes: log_decay <= 0 everywhere (one
            reduction, and on a GPU a host sync per call, so it is off by default).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] or None). States are computed in
        fp32 (fp64 for fp64 inputs), and the final state is returned in that precision.
    """
    fn = "chunk_linear_attn"
    shape = check_linear_attn_inputs(fn, q, k, v, log_decay, initial_state, causal=causal, scale=scale,
                                     check_values=validate)
    chunk_size = effective_chunk_size(chunk_size, shape.decay, fn)
    scale = 1.0 if scale is None else float(scale)
    if not causal:
        o, final_state = bidirectional_linear_attn(q, k, v, initial_state, scale)
    else:
        o, final_state = _ChunkLinearAttn.apply(q, k, v, log_decay, initial_state, shape.decay, scale, chunk_size)
    return o, (final_state if output_final_state else None)
