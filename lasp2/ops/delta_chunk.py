"""The delta rule in chunks on one device: the public op and its hand-written autograd (the
math and the pieces are in `delta_kernels.py`)."""
from __future__ import annotations

import dataclasses

import torch

from .checks import check_chunk_size, compute_dtype
from .delta_checks import check_delta_rule_inputs
from .documents import (add_state_tokens, check_document_states, check_readable, documents, read_states,
                        scatter_tokens, with_state_tokens)
from .delta_kernels import (add_query_side, carry, delta_chunks, entering_grads, grad_carry, key_side_grads, outputs,
                            query_side_grads, rebuild_chunks)
from .policy import policy_for, under_forward_policy
from .precision import without_autocast


class _ChunkDeltaRule(torch.autograd.Function):
    """Forward: the chunks' terms, the state carried chunk to chunk, the outputs batched over
    chunks. Keeps the inputs as given, the state entering each chunk (K x V per chunk, fp32) and,
    as the device policy says, the chunks' costly terms, all through save_for_backward
    (activation checkpointing drops them); the backward recomputes the rest of the chunks' terms
    (batched over chunks, no loop) and runs the same pieces in reverse (`delta_kernels`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, initial_state, shape, scale, chunk_size, resets):
        ctx.set_materialize_grads(False)
        ctx.policy = policy_for(q.device)
        x = add_query_side(delta_chunks(shape, q, k, v, beta, log_decay, chunk_size, resets))
        state = x.zero_state() if initial_state is None else initial_state.to(x.q.dtype)
        entering, final_state = carry(x, state)
        o = x.unchunk(scale * outputs(x, entering), v.dtype)
        ctx.save_for_backward(q, k, v, beta, log_decay, resets, entering, *x.kept_for_backward())
        ctx.shape, ctx.scale, ctx.chunk_size = shape, scale, chunk_size
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, final_state

    @staticmethod
    @without_autocast
    @under_forward_policy
    def backward(ctx, do, d_final):
        if do is None and d_final is None:
            return (None,) * 10
        q, k, v, beta, log_decay, resets, entering, *kept = ctx.saved_tensors
        x = rebuild_chunks(ctx.shape, (q, k, v, beta, log_decay), ctx.chunk_size, resets, kept)
        do = x.output_grad(do, ctx.scale)
        d_leaving, d_initial = grad_carry(x, entering_grads(x, do),
                                          None if d_final is None else d_final.to(x.q.dtype))
        dq, dk, dv, dbeta, dg = key_side_grads(x, entering, d_leaving, *query_side_grads(x, do, entering))
        d_initial = None if ctx.state_dtype is None else d_initial.to(ctx.state_dtype)
        return (*(None if g is None else g.to(t.dtype) for g, t in zip((dq, dk, dv, dbeta, dg), (q, k, v, beta, log_decay))),
                d_initial, None, None, None, None)


def _packed(q, k, v, beta, log_decay, initial_state, output_final_state, shape, scale, chunk_size, docs):
    """chunk_delta_rule over packed documents; per-document states through state tokens
    (`documents.with_state_tokens`), in the compute dtype so that states are not rounded."""
    resets = docs.starts(q.device)[None]
    if initial_state is None and not output_final_state:
        return _ChunkDeltaRule.apply(q, k, v, beta, log_decay, None, shape, scale, chunk_size, resets)[0], None
    check_readable("chunk_delta_rule", scale, output_final_state)
    dtype = compute_dtype(shape.dtype)
    lay = with_state_tokens(docs, shape.key_dim, write=initial_state is not None, read=output_final_state,
                            device=q.device)
    q2, k2, v2 = add_state_tokens(lay, q, k, v, initial_state, dtype)
    beta2 = scatter_tokens(beta.to(dtype), lay.real, lay.length)
    if lay.writes is not None:  # beta = 1: a writer overwrites row i of the state
        beta2 = beta2.index_fill(1, lay.writes.flatten(), 1.0)
    g2 = None if log_decay is None else scatter_tokens(log_decay.to(dtype), lay.real, lay.length)
    longer = dataclasses.replace(shape, seq_len=lay.length, dtype=dtype)
    resets = lay.documents.starts(q.device)[None]
    o2, _ = _ChunkDeltaRule.apply(q2, k2, v2, beta2, g2, None, longer, scale, chunk_size, resets)
    return o2[:, lay.real].to(shape.dtype), None if lay.reads is None else read_states(o2, lay, scale)


@without_autocast
def chunk_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=64, validate=False, cu_seqlens=None):
    """Delta rule (DeltaNet, Gated DeltaNet, KDA) in chunks; the shapes and semantics of
    `naive_recurrent_delta_rule`.

    Args:
        q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv % Hk == 0; beta: [B, T, Hv] in [0, 2].
        log_decay: None, [B, T, Hv] or [B, T, Hv, K], every value <= 0.
        scale: None means 1. initial_state: [B, Hv, K, V] or None.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (per-channel gates use at most 16).
        validate: also check the values (beta in [0, 2], log decay <= 0): a host sync on GPU.
        cu_seqlens: None, or [N + 1] int64 offsets of N documents packed in one row (B = 1; or
            `Documents`, read once per batch, where a tensor is read on the host per call):
            each document is computed alone, and initial_state / the final state are
            [N, Hv, K, V], one per document (`lasp2.ops.documents`; asking for them costs 2·K
            extra tokens per document).
    Returns:
        (o [B, T, Hv, V] in v's dtype, final state [B, Hv, K, V] in fp32 (fp64 for fp64 inputs)
        or None). Differentiable in every tensor input (a hand-written backward).
    """
    fn = "chunk_delta_rule"
    shape = check_delta_rule_inputs(fn, q, k, v, beta, log_decay, None if cu_seqlens is not None else initial_state,
                                    scale=scale, check_values=validate)
    scale = 1.0 if scale is None else float(scale)
    chunk_size = check_chunk_size(chunk_size, fn)
    if cu_seqlens is not None:
        docs = documents(cu_seqlens, fn, shape.seq_len, shape.batch)
        check_document_states(fn, initial_state, docs, (shape.value_heads, shape.key_dim, shape.value_dim))
        return _packed(q, k, v, beta, log_decay, initial_state, output_final_state, shape, scale, chunk_size,
                       docs)
    o, final_state = _ChunkDeltaRule.apply(q, k, v, beta, log_decay, initial_state, shape, scale, chunk_size, None)
    return o, (final_state if output_final_state else None)
