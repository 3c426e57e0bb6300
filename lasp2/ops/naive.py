"""Token-by-token linear attention: the reference every other implementation is tested against.

Slow (a Python loop over T) and obviously correct: it is the recurrence of the design note,

    S_n = diag(exp(g_n)) S_{n-1} + k_n^T v_n,      o_n = scale * q_n S_n

and, for causal=False, o_n = scale * q_n (S_0 + sum_m k_m^T v_m).
"""
from __future__ import annotations

import torch

from .checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_NONE, DECAY_TOKEN, check_linear_attn_inputs, compute_dtype
from .documents import check_document_states, documents, each_document


def naive_recurrent_linear_attn(q, k, v, log_decay=None, *, scale=None, initial_state=None, causal=True,
                                cu_seqlens=None):
    """Reference linear attention, one token at a time.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        log_decay: None, [H], [B, T, H] or [B, T, H, K]; log of the per-token decay, all <= 0.
        scale: multiplies every output; None means 1 (the unnormalised form).
        initial_state: [B, H, K, V] state before the first token ([N, H, K, V] with cu_seqlens:
            one per document), or None for zeros.
        causal: False gives the bidirectional form (only without decay).
        cu_seqlens: None, or [N + 1] int64 offsets of N documents packed in one row (B = 1):
            each document is computed alone (`lasp2.ops.documents`).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] ([N, H, K, V] with cu_seqlens)
        in the compute dtype: float64 for float64 inputs, float32 otherwise). Differentiable by
        autograd.
    """
    fn = "naive_recurrent_linear_attn"
    shape = check_linear_attn_inputs(fn, q, k, v, log_decay, None if cu_seqlens is not None else initial_state,
                                     causal=causal, scale=scale, check_values=True)
    if cu_seqlens is not None:  # each document alone, joined
        docs = documents(cu_seqlens, fn, shape.seq_len, shape.batch)
        check_document_states(fn, initial_state, docs, (shape.num_heads, shape.key_dim, shape.value_dim))
        return each_document(docs, initial_state, lambda span, state: naive_recurrent_linear_attn(
            q[:, span], k[:, span], v[:, span],
            log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, span], scale=scale,
            initial_state=state, causal=causal))
    dtype = compute_dtype(q.dtype)
    scale = 1.0 if scale is None else float(scale)
    b, t, h, dk, dv = shape.batch, shape.seq_len, shape.num_heads, shape.key_dim, shape.value_dim
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    state = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(dtype)

    if not causal:
        state = state + torch.einsum("bthk,bthv->bhkv", k, v)
        o = scale * torch.einsum("bthk,bhkv->bthv", q, state)
        return o.to(shape.dtype), state

    g = None if log_decay is None else log_decay.to(dtype)
    outputs = []
    for n in range(t):
        if shape.decay == DECAY_HEAD:
            state = torch.exp(g)[None, :, None, None] * state
        elif shape.decay == DECAY_TOKEN:
            state = torch.exp(g[:, n])[:, :, None, None] * state
        elif shape.decay == DECAY_CHANNEL:
            state = torch.exp(g[:, n])[:, :, :, None] * state
        else:
            assert shape.decay == DECAY_NONE
        state = state + k[:, n, :, :, None] * v[:, n, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, n], state))
    return torch.stack(outputs, dim=1).to(shape.dtype), state
