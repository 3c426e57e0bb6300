"""Affine scans of K x V states along a slot axis (chunks of one sequence, or ranks of a group).

A slot n holds a state contribution x_n [K, V] and a transition a_n [Kg] (a_n = 1 without decay;
Kg is K for per-channel gates and 1 for scalar decay, scaling the rows of the state):

    prefix:  s_0 = 0,  s_{n+1} = a_n * s_n + x_n        (the state entering each slot)
    suffix:  r_N = 0,  r_n = x_n + a_n * r_{n+1}          (the gradient leaving each slot)

Shapes: x [..., N, K, V], a [..., N, Kg] or None. The loop runs over N slots; each step is one
elementwise op on [..., K, V], so it stays cheap next to the matmuls that produce x.
"""
from __future__ import annotations

import math

import torch


def prefix_scan(x: torch.Tensor, a: torch.Tensor | None = None):
    """Returns (before [..., N, K, V] with before[n] = s_n, total s_N [..., K, V])."""
    return _scan(x, a, reverse=False)


def suffix_scan(x: torch.Tensor, a: torch.Tensor | None = None):
    """Returns (after [..., N, K, V] with after[n] = r_{n+1}, total r_0 [..., K, V]).

    after[n] is the gradient w.r.t. the state leaving slot n from every later slot; r_0 is the
    gradient w.r.t. the state entering slot 0.
    """
    return _scan(x, a, reverse=True)


def _scan(x: torch.Tensor, a: torch.Tensor | None, reverse: bool):
    n_slots = x.shape[-3]
    group = _group_size(n_slots)
    if group == 1:
        return _sequential_scan(x, a, reverse)
    # Two levels, ~2 sqrt(N) steps instead of N: scan inside groups of `group` slots (all groups
    # at once), scan the group totals, then add each group's incoming state, decayed to each slot.
    xg = _grouped(x, group, fill=0.0)
    ag = None if a is None else _grouped(a.unsqueeze(-1), group, fill=1.0).squeeze(-1)
    inner, totals = _sequential_scan(xg, ag, reverse)  # [..., G, g, K, V], [..., G, K, V]
    group_decay = None if ag is None else torch.prod(ag, dim=-2)  # [..., G, Kg]
    group_in, total = _sequential_scan(totals, group_decay, reverse)
    if ag is None:
        inner += group_in.unsqueeze(-3)
    else:
        decay_in = _exclusive_cumprod(ag, dim=-2, reverse=reverse)  # group edge -> each slot
        inner.addcmul_(decay_in.unsqueeze(-1), group_in.unsqueeze(-3))
    return _ungrouped(inner, n_slots), total


def _group_size(n_slots: int) -> int:
    """1 (plain loop) for short scans, else a group size near sqrt(N), dividing N if one does."""
    if n_slots <= 16:
        return 1
    root = math.isqrt(n_slots)
    return next((d for d in range(root, 2 * root + 1) if n_slots % d == 0), root + 1)


def _grouped(x: torch.Tensor, group: int, fill: float) -> torch.Tensor:
    """[..., N, K, V] -> [..., G, group, K, V], padded at the end with `fill` (0 for states, 1
    for decays, so padding slots change nothing); a view when group divides N."""
    n = x.shape[-3]
    pad = -n % group
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-3], pad, *x.shape[-2:]), fill)], dim=-3)
    return x.view(*x.shape[:-3], -1, group, *x.shape[-2:])


def _ungrouped(x: torch.Tensor, n_slots: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-4], -1, *x.shape[-2:])[..., :n_slots, :, :]


def _exclusive_cumprod(a: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """prod of a over the slots before each one in scan order (1 for the first)."""
    out = torch.ones_like(a)
    n = a.shape[dim]
    if n > 1:
        if reverse:
            out.narrow(dim, 0, n - 1).copy_(a.narrow(dim, 1, n - 1).flip(dim).cumprod(dim).flip(dim))
        else:
            torch.cumprod(a.narrow(dim, 0, n - 1), dim=dim, out=out.narrow(dim, 1, n - 1))
    return out


def _sequential_scan(x: torch.Tensor, a: torch.Tensor | None, reverse: bool):
    """One step per slot: out[n] is the carry entering slot n in scan order; returns (out, the
    carry leaving the last slot)."""
    order = list(range(x.shape[-3]))
    order = order[::-1] if reverse else order

    def step(n, out=None):  # x_n + a_n * carry_n, with a_n scaling the rows
        carry = result[..., n, :, :]
        if a is None:
            return torch.add(x[..., n, :, :], carry, out=out)
        return torch.addcmul(x[..., n, :, :], a[..., n, :].unsqueeze(-1), carry, out=out)

    result = torch.empty_like(x)
    result[..., order[0], :, :] = 0
    for prev, n in zip(order, order[1:]):
        step(prev, out=result[..., n, :, :])
    return result, step(order[-1])


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{m < n} x_m along `dim`, formed without subtracting (no cancellation)."""
    n = x.shape[dim]
    if torch.is_grad_enabled() and x.requires_grad:  # autograd cannot see through out=
        return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), torch.cumsum(x.narrow(dim, 0, n - 1), dim=dim)], dim=dim)
    out = torch.empty_like(x)
    out.narrow(dim, 0, 1).zero_()
    if n > 1:
        torch.cumsum(x.narrow(dim, 0, n - 1), dim=dim, out=out.narrow(dim, 1, n - 1))
    return out


def reverse_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{m >= n} x_m along `dim`."""
    return x.flip(dim).cumsum(dim).flip(dim)


def reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{m > n} x_m along `dim`, formed without subtracting."""
    return exclusive_cumsum(x.flip(dim), dim).flip(dim)
