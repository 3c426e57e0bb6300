"""Bidirectional (non-causal) linear attention pieces: o_n = scale * q_n S, S = S0 + sum_m k_m^T v_m.

Every token sees one shared K x V state, so forward and backward are a handful of contractions;
they are kept here so that sequence-parallel wrappers only add communication around them.
Shapes: q, k [B, T, H, K]; v, do [B, T, H, V]; states [B, H, K, V] in the compute dtype.
"""
from __future__ import annotations

import torch

from .checks import compute_dtype


def local_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_m k_m^T v_m over this stretch of tokens, [B, H, K, V]."""
    dtype = compute_dtype(k.dtype)
    return torch.einsum("bthk,bthv->bhkv", k.to(dtype), v.to(dtype))


def state_output(q: torch.Tensor, state: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q_n S for every token, [B, T, H, V] in the compute dtype."""
    return scale * torch.einsum("bthk,bhkv->bthv", q.to(state.dtype), state)


def state_grad(q: torch.Tensor, do: torch.Tensor, scale: float) -> torch.Tensor:
    """dL/dS of `state_output`, [B, H, K, V]."""
    dtype = compute_dtype(q.dtype)
    return scale * torch.einsum("bthk,bthv->bhkv", q.to(dtype), do.to(dtype))


def query_grad(do: torch.Tensor, state: torch.Tensor, scale: float) -> torch.Tensor:
    """dL/dq of `state_output`, [B, T, H, K]."""
    return scale * torch.einsum("bthv,bhkv->bthk", do.to(state.dtype), state)


def key_value_grads(k: torch.Tensor, v: torch.Tensor, d_state: torch.Tensor):
    """(dL/dk, dL/dv) of `local_state` given dL/dS, [B, T, H, K] and [B, T, H, V]."""
    dk = torch.einsum("bthv,bhkv->bthk", v.to(d_state.dtype), d_state)
    dv = torch.einsum("bthk,bhkv->bthv", k.to(d_state.dtype), d_state)
    return dk, dv


def bidirectional_linear_attn(q, k, v, initial_state, scale: float):
    """Single device, plain autograd: -> (o [B, T, H, V] in q's dtype, final state S)."""
    state = local_state(k, v)
    if initial_state is not None:
        state = state + initial_state.to(state.dtype)
    return state_output(q, state, scale).to(q.dtype), state
