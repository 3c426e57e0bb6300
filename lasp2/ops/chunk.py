"""Chunked linear attention on one device: the public op and its hand-written autograd."""
from __future__ import annotations

import torch

from .bidirectional import bidirectional_linear_attn
from .checks import DECAY_CHANNEL, DECAY_HEAD, check_chunk_size, check_linear_attn_inputs, compute_dtype
from .chunk_kernels import add_incoming, add_outgoing_grad, grad_state_pass, state_pass, tiled_input_grads, tiled_outputs
from .chunk_layout import ChunkedSeq
from .documents import (add_state_tokens, check_document_states, check_readable, documents, each_document,
                        read_states, reset_log_decay, scatter_tokens, with_state_tokens)
from .policy import policy_for, under_forward_policy
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
        ctx.policy = policy_for(q.device)
        x = ChunkedSeq.from_inputs(q, k, v, log_decay, kind, chunk_size)
        S0 = None if initial_state is None else initial_state.to(x.state_dtype)
        h_start, final_state = state_pass(x)
        if S0 is not None:
            h_start, final_state = add_incoming(x, h_start, final_state, S0)
        o = tiled_outputs(x, x.tiles(), h_start, scale)
        x.save_for_backward(ctx, (q, k, v, log_decay), h_start)
        ctx.scale = scale
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o, final_state

    @staticmethod
    @without_autocast
    @under_forward_policy
    def backward(ctx, do, d_final):
        if do is None and d_final is None:
            return (None,) * 8
        x, (h_start,) = ChunkedSeq.from_ctx(ctx)
        do_hat = x.output_grad(do, ctx.scale) if do is not None else x.v.new_zeros(x.v.shape, dtype=x.state_dtype)
        delta_after, dS0 = grad_state_pass(x, do_hat)
        if d_final is not None:
            delta_after, dS0 = add_outgoing_grad(x, delta_after, dS0, d_final.to(x.state_dtype))
        grads = tiled_input_grads(x, x.tiles(), h_start, delta_after, do_hat)
        dS0 = None if ctx.initial_dtype is None else dS0.to(ctx.initial_dtype)
        return (*grads, dS0, None, None, None)


def _packed(q, k, v, log_decay, initial_state, output_final_state, shape, scale, chunk_size, causal, docs):
    """chunk_linear_attn over packed documents: each document's first token resets the state (a
    log decay of RESET_LOG_DECAY there, so every decay form becomes per token, or per channel);
    per-document states through state tokens, in the compute dtype."""
    fn = "chunk_linear_attn"
    if not causal:  # every token sees its whole document: one bidirectional call per document
        return each_document(docs, initial_state, lambda span, state: bidirectional_linear_attn(
            q[:, span], k[:, span], v[:, span], state, scale))
    check_readable(fn, scale, output_final_state)
    H, K, T, dtype = shape.num_heads, shape.key_dim, shape.seq_len, compute_dtype(shape.dtype)
    if initial_state is None and not output_final_state:
        g, kind = reset_log_decay(log_decay, shape.decay, docs.starts(q.device), H, K, dtype)
        return _ChunkLinearAttn.apply(q, k, v, g, None, kind, scale, effective_chunk_size(chunk_size, kind, fn))[0], None
    lay = with_state_tokens(docs, K, write=initial_state is not None, read=output_final_state, device=q.device)
    q2, k2, v2 = add_state_tokens(lay, q, k, v, initial_state, dtype)
    g = log_decay.view(1, 1, H).expand(1, T, H) if shape.decay == DECAY_HEAD else log_decay
    g2 = None if g is None else scatter_tokens(g.to(dtype), lay.real, lay.length)
    g2, kind = reset_log_decay(g2, shape.decay, lay.documents.starts(q.device), H, K, dtype)
    o2, _ = _ChunkLinearAttn.apply(q2, k2, v2, g2, None, kind, scale, effective_chunk_size(chunk_size, kind, fn))
    return o2[:, lay.real].to(shape.dtype), None if lay.reads is None else read_states(o2, lay, scale)


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
    cu_seqlens=None,
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
        cu_seqlens: None, or [N + 1] int64 offsets of N documents packed in one row (B = 1; or
            `Documents`, read once per batch, where a tensor is read on the host per call):
            each document is computed alone (its first token resets the state, so every decay
            form runs as a per-token one, per-channel stays per channel), and initial_state / the
            final state are [N, H, K, V], one per document (`lasp2.ops.documents`; asking for
            them costs 2·K extra tokens per document).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] or None). States are computed in
        fp32 (fp64 for fp64 inputs), and the final state is returned in that precision.
    """
    fn = "chunk_linear_attn"
    shape = check_linear_attn_inputs(fn, q, k, v, log_decay, None if cu_seqlens is not None else initial_state,
                                     causal=causal, scale=scale, check_values=validate)
    scale = 1.0 if scale is None else float(scale)
    if cu_seqlens is not None:
        docs = documents(cu_seqlens, fn, shape.seq_len, shape.batch)
        check_document_states(fn, initial_state, docs, (shape.num_heads, shape.key_dim, shape.value_dim))
        o, final_state = _packed(q, k, v, log_decay, initial_state, output_final_state, shape, scale, chunk_size,
                                 causal, docs)
        return o, (final_state if output_final_state else None)
    chunk_size = effective_chunk_size(chunk_size, shape.decay, fn)
    if not causal:
        o, final_state = bidirectional_linear_attn(q, k, v, initial_state, scale)
    else:
        o, final_state = _ChunkLinearAttn.apply(q, k, v, log_decay, initial_state, shape.decay, scale, chunk_size)
    return o, (final_state if output_final_state else None)
