"""One decoded token at a time: the recurrences and the short convolution continued from a state.

Every function takes the new token(s) [B, 1, ...] and the state left by the tokens before (by a
prefill, `output_final_state=True`, or the previous step) and returns the output and the next
state; nothing reads a value back to the host and nothing grows with the sequence, so a step is a
fixed set of kernels. The token-by-token references (`naive.py`, `delta_naive.py`) are what
these must equal, step after step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F



def _decay(log_decay: torch.Tensor | None, batch: int, heads: int, dtype) -> torch.Tensor | None:
    """A log decay of one token (None, [H], [B, 1, H] or [B, 1, H, K]) as the factor on the
    state's rows, [B, H, 1 or K, 1]."""
    if log_decay is None:
        return None
    g = log_decay.to(dtype)
    if g.dim() == 1:
        return g.exp().view(1, heads, 1, 1).expand(batch, heads, 1, 1)
    if g.dim() == 3:
        return g[:, 0].exp()[:, :, None, None]
    return g[:, 0].exp()[:, :, :, None]


def linear_attn_step(q, k, v, log_decay, state, *, scale=None):
    """S = diag(exp g) S + k^T v, o = scale · q S for one token.

    Args:
        q, k: [B, 1, H, K]; v: [B, 1, H, V]; log_decay: None, [H], [B, 1, H] or [B, 1, H, K].
        state: [B, H, K, V] in the compute dtype (fp32; fp64 for fp64 inputs).
    Returns:
        (o [B, 1, H, V] in q's dtype, the next state [B, H, K, V]).
    """
    dtype = state.dtype
    decay = _decay(log_decay, q.shape[0], q.shape[2], dtype)
    state = state if decay is None else decay * state
    state = state + k[:, 0].to(dtype).unsqueeze(-1) * v[:, 0].to(dtype).unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q[:, 0].to(dtype), state) * (1.0 if scale is None else scale)
    return o.unsqueeze(1).to(q.dtype), state


def delta_rule_step(q, k, v, beta, log_decay, state, *, scale=None):
    """The (gated) delta rule for one token: S = diag(exp g) S, S += beta k^T (v − k S),
    o = scale · q S; q and k have Hk heads, each shared by Hv / Hk value heads.

    Args:
        q, k: [B, 1, Hk, K]; v: [B, 1, Hv, V]; beta: [B, 1, Hv]; log_decay: None, [B, 1, Hv] or
        [B, 1, Hv, K]; state: [B, Hv, K, V] in the compute dtype.
    Returns:
        (o [B, 1, Hv, V] in v's dtype, the next state).
    """
    dtype = state.dtype
    group = v.shape[2] // q.shape[2]
    q, k = (x[:, 0].to(dtype).repeat_interleave(group, dim=1) for x in (q, k))  # [B, Hv, K]
    decay = _decay(log_decay, v.shape[0], v.shape[2], dtype)
    state = state if decay is None else decay * state
    error = v[:, 0].to(dtype) - torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + beta[:, 0].to(dtype)[:, :, None, None] * k.unsqueeze(-1) * error.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q, state) * (1.0 if scale is None else scale)
    return o.unsqueeze(1).to(v.dtype), state


def conv_step(x, tail, weight, bias=None, activation="silu"):
    """The short causal depthwise convolution of one token continued from the w−1 inputs before it.

    Args:
        x: [B, 1, D]; tail: [B, w−1, D] the previous inputs (oldest first); weight: [D, w];
        bias: [D] or None; activation: "silu" or None.
    Returns:
        (out [B, 1, D] in x's dtype, the next tail [B, w−1, D]).
    """
    window = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, w, D]
    out = (window * weight.to(x.dtype).t().unsqueeze(0)).sum(dim=1, keepdim=True)
    if bias is not None:
        out = out + bias.to(x.dtype)
    out = F.silu(out) if activation == "silu" else out
    return out, window[:, 1:]

