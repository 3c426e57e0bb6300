"""Chunked linear attention on one device: the public op and its hand-written autograd."""
from __future__ import annotations

import torch

from .bidirectional import bidirectional_linear_attn
from .boundary import apply_total_decay, final_state_grads, initial_state_grads, initial_state_output, total_decay
from .precision import without_autocast
from .checks import DECAY_CHANNEL, check_linear_attn_inputs
from .chunk_kernels import grad_pass, grad_state_pass, output_pass, state_pass
from .chunk_layout import ChunkedSeq

def effective_chunk_size(chunk_size, kind: str, fn: str) -> int:
    """The chunk length used: `chunk_size`, except that per-channel (GLA) decay, whose
    intra-chunk term is built by binary splitting, rounds it down to a power of two."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    return 1 << (chunk_size.bit_length() - 1) if kind == DECAY_CHANNEL else chunk_size


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


class _ChunkLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, kind, scale, chunk_size):
        ctx.set_materialize_grads(False)
        x = ChunkedSeq.from_inputs(q, k, v, log_decay, kind, chunk_size)
        h_start, final_state = state_pass(x)
        o = output_pass(x, h_start, scale)
        if initial_state is not None:
            S0 = initial_state.to(x.q.dtype)
            o += initial_state_output(x, S0, scale)
            final_state = final_state + apply_total_decay(total_decay(x), S0)
        x.save_for_backward(ctx, q, k, v, log_decay, initial_state)
        ctx.scale = scale
        return x.unchunk(o, q.dtype), final_state

    @staticmethod
    @without_autocast
    def backward(ctx, do, d_final):
        x, (initial_state,) = ChunkedSeq.from_ctx(ctx)
        S0 = None if initial_state is None else initial_state.to(x.q.dtype)
        dq = dk = dv = dg = dS0 = None
        if do is not None:
            do_hat = x.output_grad(do, ctx.scale)
            h_start, _ = state_pass(x)
            delta_after, dS0 = grad_state_pass(x, do_hat)
            dq, dk, dv, dg = grad_pass(x, do_hat, h_start, delta_after)
            if S0 is not None:
                dq_s0, dg_s0 = initial_state_grads(x, do_hat, S0)
                dq, dg = dq + dq_s0, _add(dg, dg_s0)
        if d_final is not None:
            dk_f, dv_f, dg_f, dS0_f = final_state_grads(x, d_final.to(x.q.dtype), S0)
            dq = torch.zeros_like(x.q) if dq is None else dq
            dk, dv, dg, dS0 = _add(dk, dk_f), _add(dv, dv_f), _add(dg, dg_f), _add(dS0, dS0_f)
        if dq is None:
            return (None,) * 8
        dS0 = None if initial_state is None else dS0.to(initial_state.dtype)
        return (*x.input_grads(dq, dk, dv, dg), dS0, None, None, None)


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

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] or None). States are computed in
        fp32 (fp64 for fp64 inputs), and the final state is returned in that precision.
    """
    fn = "chunk_linear_attn"
    shape = check_linear_attn_inputs(fn, q, k, v, log_decay, initial_state, causal=causal, scale=scale)
    chunk_size = effective_chunk_size(chunk_size, shape.decay, fn)
    scale = 1.0 if scale is None else float(scale)
    if not causal:
        o, final_state = bidirectional_linear_attn(q, k, v, initial_state, scale)
    else:
        o, final_state = _ChunkLinearAttn.apply(q, k, v, log_decay, initial_state, shape.decay, scale, chunk_size)
    return o, (final_state if output_final_state else None)
