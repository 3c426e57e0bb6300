"""The delta rule token by token: the reference the chunked and parallel forms are tested against.

Per token, the decay first, then the delta update of the state S [K, V] (per value head):

    S' = Diag(exp(g_t)) S_{t-1}                    (g_t: none, a scalar, or a K-vector; <= 0)
    S_t = S' + beta_t k_t^T (v_t - k_t S')         o_t = scale * q_t S_t

i.e. S_t = (I - beta_t k_t^T k_t) Diag(exp(g_t)) S_{t-1} + beta_t k_t^T v_t. DeltaNet has no
gate, Gated DeltaNet a scalar per head and token, KDA one per key channel. Grouped values: key
head h serves value heads h·G … h·G+G−1.
"""
from __future__ import annotations

import torch

from .checks import DECAY_CHANNEL, DECAY_TOKEN, compute_dtype
from .delta_checks import check_delta_rule_inputs
from .documents import check_document_states, documents, each_document


def naive_recurrent_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """Reference delta rule, one token at a time.

    Args:
        q: [B, T, Hk, K] queries; k: [B, T, Hk, K] keys (normalise them yourself: the rule is
            a contraction for |k|^2 * beta <= 2).
        v: [B, T, Hv, V] values, Hv % Hk == 0.
        beta: [B, T, Hv] step sizes in [0, 2].
        log_decay: None, [B, T, Hv] or [B, T, Hv, K]; log of the gate, every value <= 0.
        scale: multiplies every output; None means 1.
        initial_state: [B, Hv, K, V] state before the first token ([N, Hv, K, V] with
            cu_seqlens: one per document), or None for zeros.
        cu_seqlens: None, or [N + 1] int64 offsets of N documents packed in one row (B = 1):
            each document is computed alone (`lasp2.ops.documents`).

    Returns:
        (o [B, T, Hv, V] in v's dtype, final_state [B, Hv, K, V] ([N, Hv, K, V] with cu_seqlens)
        in the compute dtype: fp64 for fp64 inputs, fp32 otherwise). Differentiable by autograd.
    """
    fn = "naive_recurrent_delta_rule"
    shape = check_delta_rule_inputs(fn, q, k, v, beta, log_decay, None if cu_seqlens is not None else initial_state,
                                    scale=scale, check_values=True)
    if cu_seqlens is not None:  # each document alone, joined
        docs = documents(cu_seqlens, fn, shape.seq_len, shape.batch)
        check_document_states(fn, initial_state, docs, (shape.value_heads, shape.key_dim, shape.value_dim))
        return each_document(docs, initial_state, lambda span, state: naive_recurrent_delta_rule(
            q[:, span], k[:, span], v[:, span], beta[:, span], None if log_decay is None else log_decay[:, span],
            scale=scale, initial_state=state))
    dtype = compute_dtype(shape.dtype)
    scale = 1.0 if scale is None else float(scale)
    G = shape.group
    q, k = (x.to(dtype).repeat_interleave(G, dim=2) for x in (q, k))  # [B, T, Hv, K]
    v, beta = v.to(dtype), beta.to(dtype)
    g = None if log_decay is None else log_decay.to(dtype)
    b, hv, dk, dv = shape.batch, shape.value_heads, shape.key_dim, shape.value_dim
    state = q.new_zeros(b, hv, dk, dv) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(shape.seq_len):
        if shape.decay == DECAY_TOKEN:
            state = torch.exp(g[:, n])[:, :, None, None] * state
        elif shape.decay == DECAY_CHANNEL:
            state = torch.exp(g[:, n])[:, :, :, None] * state
        kn = k[:, n]  # [B, Hv, K]
        error = v[:, n] - torch.einsum("bhk,bhkv->bhv", kn, state)
        state = state + beta[:, n, :, None, None] * kn[:, :, :, None] * error[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, n], state))
    return torch.stack(outputs, dim=1).to(shape.dtype), state
