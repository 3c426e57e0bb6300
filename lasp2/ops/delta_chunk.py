"""The delta rule in chunks on one device: the public op and its hand-written autograd (the
math and the pieces are in `delta_kernels.py`)."""
from __future__ import annotations

import torch

from .checks import check_chunk_size
from .delta_checks import check_delta_rule_inputs
from .delta_kernels import (add_query_side, carry, delta_chunks, grad_carry, key_side_grads, outputs,
                            query_side_grads)
from .precision import without_autocast


class _ChunkDeltaRule(torch.autograd.Function):
    """Forward: the chunks' terms, the state carried chunk to chunk, the outputs batched over
    chunks. Keeps the within-chunk terms and the state entering each chunk (K x V per chunk) for
    the backward, which runs the same pieces in reverse (`delta_kernels`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, initial_state, shape, scale, chunk_size):
        ctx.set_materialize_grads(False)
        x = add_query_side(delta_chunks(shape, q, k, v, beta, log_decay, chunk_size))
        state = x.zero_state() if initial_state is None else initial_state.to(x.q.dtype)
        entering, final_state = carry(x, state)
        o = x.unchunk(scale * outputs(x, entering), v.dtype)
        x.PU = None  # the backward needs the other terms: kept rather than recomputed
        ctx.chunks, ctx.entering, ctx.scale = x, entering, scale
        ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, beta, log_decay)]
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, final_state

    @staticmethod
    @without_autocast
    def backward(ctx, do, d_final):
        x, entering = ctx.chunks, ctx.entering
        if do is None and d_final is None:
            return (None,) * 9
        do = x.output_grad(do, ctx.scale)
        d_leaving, d_initial = grad_carry(x, x.Qe.transpose(-1, -2) @ do,
                                          None if d_final is None else d_final.to(x.q.dtype))
        dq, dk, dv, dbeta, dg = key_side_grads(x, entering, d_leaving, *query_side_grads(x, do, entering))
        d_initial = None if ctx.state_dtype is None else d_initial.to(ctx.state_dtype)
        return (*(None if g is None else g.to(dtype) for g, dtype in zip((dq, dk, dv, dbeta, dg), ctx.dtypes)),
                d_initial, None, None, None)


@without_autocast
def chunk_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=64, validate=False):
    """Delta rule (DeltaNet, Gated DeltaNet, KDA) in chunks; the shapes and semantics of
    `naive_recurrent_delta_rule`.

    Args:
        q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv % Hk == 0; beta: [B, T, Hv] in [0, 2].
        log_decay: None, [B, T, Hv] or [B, T, Hv, K], every value <= 0.
        scale: None means 1. initial_state: [B, Hv, K, V] or None.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (per-channel gates use at most 16).
        validate: also check the values (beta in [0, 2], log decay <= 0): a host sync on GPU.
    Returns:
        (o [B, T, Hv, V] in v's dtype, final state [B, Hv, K, V] in fp32 (fp64 for fp64 inputs)
        or None). Differentiable in every tensor input (a hand-written backward).
    """
    shape = check_delta_rule_inputs("chunk_delta_rule", q, k, v, beta, log_decay, initial_state, scale=scale,
                                    check_values=validate)
    o, final_state = _ChunkDeltaRule.apply(q, k, v, beta, log_decay, initial_state, shape,
                                           1.0 if scale is None else float(scale),
                                           check_chunk_size(chunk_size, "chunk_delta_rule"))
    return o, (final_state if output_final_state else None)
