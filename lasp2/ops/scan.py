"""Affine scans of K x V states along a slot axis (chunks of one sequence, or ranks of a group).

A slot n holds a state contribution x_n [K, V] and a transition a_n: a [Kg] row scale (a_n = 1
without decay; Kg is K for per-channel gates and 1 for scalar decay) or, with dense=True, a
K x K matrix (the delta rule):

    prefix:  s_0 = 0,  s_{n+1} = a_n s_n + x_n        (the state entering each slot)
    suffix:  r_N = 0,  r_n = x_n + a_n r_{n+1}          (the gradient leaving each slot; pass
                                                        the transposed matrices for A^T)

Shapes: x [..., N, K, V] and a [..., N, Kg], [..., N, K, K] or None, with the slot axis at `dim`
of x (-3 by default; -4 for [B, N, H, K, V], where a is [B, N, H, Kg]).

How the scan runs is the device policy's (`policy.scan`). "blocked" (CPU, eager): for row
scales two levels of loops, ~2 sqrt(N) element-wise steps, cheap next to the matmuls that
produce x; for dense transitions one matmul step per slot. "tree" (GPU, and anything compiled): a log-depth scan, ~13 ops per level (5 kernels)
and 2·log2(N) levels, whatever the transition (without one: a cumulative sum), so that the
launches do not grow with N. Both are exact: they differ only in the order of the additions.
"""
from __future__ import annotations

import math

import torch

from .policy import policy_for


def prefix_scan(x: torch.Tensor, a: torch.Tensor | None = None, dim: int = -3, *, dense: bool = False):
    """Returns (before, with before[n] = s_n along `dim`; the total s_N, without that axis)."""
    return _scan(x, a, reverse=False, dim=dim, dense=dense)


def suffix_scan(x: torch.Tensor, a: torch.Tensor | None = None, dim: int = -3, *, dense: bool = False):
    """Returns (after, with after[n] = r_{n+1} along `dim`; the total r_0, without that axis).

    after[n] is the gradient w.r.t. the state leaving slot n from every later slot; r_0 is the
    gradient w.r.t. the state entering slot 0.
    """
    return _scan(x, a, reverse=True, dim=dim, dense=dense)


def _scan(x: torch.Tensor, a: torch.Tensor | None, reverse: bool, dim: int, dense: bool):
    assert dim <= -3, dim
    if a is not None and not dense:
        a = a.unsqueeze(-1)  # [..., Kg, 1]: scales the rows, aligned with x
    if scans_as_trees(x.device):
        return _tree_scan(x, a, reverse, dim, dense)
    if dense:
        return _sequential_scan(x, a, reverse, dim, dense)
    n_slots = x.shape[dim]
    group = _group_size(n_slots)
    if group == 1:
        return _sequential_scan(x, a, reverse, dim)
    # Two levels, ~2 sqrt(N) steps instead of N: scan inside groups of `group` slots (all groups
    # at once), scan the group totals, then add each group's incoming state, decayed to each slot.
    xg = _grouped(x, group, 0.0, dim)  # the slot axis becomes (groups at dim - 1, slots at dim)
    ag = None if a is None else _grouped(a, group, 1.0, dim)
    inner, totals = _sequential_scan(xg, ag, reverse, dim)
    group_decay = None if ag is None else torch.prod(ag, dim=dim)
    group_in, total = _sequential_scan(totals, group_decay, reverse, dim)
    if ag is None:
        inner += group_in.unsqueeze(dim)
    else:
        decay_in = _exclusive_cumprod(ag, dim=dim, reverse=reverse)  # group edge -> each slot
        inner.addcmul_(decay_in, group_in.unsqueeze(dim))
    return _ungrouped(inner, n_slots, dim), total


def _group_size(n_slots: int) -> int:
    """1 (plain loop) for short scans, else a group size near sqrt(N), dividing N if one does."""
    if n_slots <= 16:
        return 1
    root = math.isqrt(n_slots)
    return next((d for d in range(root, 2 * root + 1) if n_slots % d == 0), root + 1)


def _grouped(x: torch.Tensor, group: int, fill: float, dim: int) -> torch.Tensor:
    """Slot axis N at `dim` -> (G, group), padded at the end with `fill` (0 for states, 1 for
    decays, so padding slots change nothing); a view when group divides N."""
    n = x.shape[dim]
    pad = -n % group
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:dim], pad, *x.shape[dim + 1:]), fill)], dim=dim)
    return x.view(*x.shape[:dim], -1, group, *x.shape[dim + 1:])


def _ungrouped(x: torch.Tensor, n_slots: int, dim: int) -> torch.Tensor:
    merged = x.reshape(*x.shape[:dim - 1], -1, *x.shape[dim + 1:])
    return merged if merged.shape[dim] == n_slots else merged.narrow(dim, 0, n_slots)


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


def _sequential_scan(x: torch.Tensor, a: torch.Tensor | None, reverse: bool, dim: int, dense: bool = False):
    """One step per slot: out[n] is the carry entering slot n in scan order; returns (out, the
    carry leaving the last slot). a is aligned with x ([..., Kg, 1], or [..., K, K] if dense)."""
    order = list(range(x.shape[dim]))
    order = order[::-1] if reverse else order

    def step(n, out=None):  # x_n + a_n carry_n, with a_n scaling the rows or multiplying
        carry = result.select(dim, n)
        if a is None:
            return torch.add(x.select(dim, n), carry, out=out)
        if dense:
            return torch.add(x.select(dim, n), a.select(dim, n) @ carry, out=out)
        return torch.addcmul(x.select(dim, n), a.select(dim, n), carry, out=out)

    result = torch.empty_like(x)
    result.select(dim, order[0]).zero_()
    for prev, n in zip(order, order[1:]):
        step(prev, out=result.select(dim, n))
    return result, step(order[-1])


def scans_as_trees(device: torch.device) -> bool:
    """Whether scans over the chunks on `device` run as log-depth trees: under a policy that
    says so, and always while torch.compile traces (a loop would unroll into the graph)."""
    return policy_for(device).tree_scans or torch.compiler.is_compiling()


def _tree_scan(x: torch.Tensor, a: torch.Tensor | None, reverse: bool, dim: int, dense: bool):
    """The log-depth scan: combine neighbouring slots pairwise into half as many (their joint
    state from zero and their composed transition), scan those, then split each pair's carry
    back into its two slots. Without transitions, a cumulative sum. a aligned with x."""
    if a is None:
        total = x.sum(dim)
        return (reverse_exclusive_cumsum(x, dim) if reverse else exclusive_cumsum(x, dim)), total
    # Slots as rows of 3-D stacks: [M * N, K, D] and [M * N, Kg or K, 1 or K], M the batch.
    xs, as_ = x.movedim(dim, -3), a.movedim(dim, -3)
    lead, n = xs.shape[:-3], xs.shape[-3]
    xs = xs.reshape(-1, *xs.shape[-2:])
    as_ = as_.expand(*lead, *as_.shape[-3:]).reshape(-1, *as_.shape[-2:])
    out, total = _tree_levels(xs, as_, xs.shape[0] // n, reverse, dense)
    return out.view(*lead, n, *x.shape[-2:]).movedim(-3, dim), total.view(*lead, *x.shape[-2:])


def _tree_levels(x: torch.Tensor, a: torch.Tensor, m: int, reverse: bool, dense: bool):
    """One level of `_tree_scan` on m sequences of n slots stacked as rows (x [m * n, K, D]);
    -> (the carry of every slot [m * n, K, D], each sequence's total [m, K, D])."""
    n = x.shape[0] // m
    if n == 1:
        return torch.zeros_like(x), x
    if n % 2:  # one more slot per sequence that changes nothing: x = 0 and the identity transition
        x = torch.cat([x.view(m, n, *x.shape[1:]), x.new_zeros(m, 1, *x.shape[1:])], dim=1).view(-1, *x.shape[1:])
        a = torch.cat([a.view(m, n, *a.shape[1:]), _identity(a, m, dense)], dim=1).view(-1, *a.shape[1:])
    x_pairs, a_pairs = x.view(-1, 2, *x.shape[1:]), a.view(-1, 2, *a.shape[1:])
    x0, x1, a0, a1 = x_pairs[:, 0], x_pairs[:, 1], a_pairs[:, 0], a_pairs[:, 1]  # each pair's two slots
    plus, product = (torch.baddbmm, torch.bmm) if dense else (torch.addcmul, torch.mul)  # c + t s; t s
    if reverse:  # r_{2i} = x_{2i} + a_{2i} (x_{2i+1} + a_{2i+1} r_{2i+2})
        carried, total = _tree_levels(plus(x0, a0, x1), product(a0, a1), m, reverse, dense)
        pieces = [plus(x1, a1, carried), carried]  # leaving slot 2i, leaving slot 2i+1
    else:  # s_{2i+2} = a_{2i+1} (a_{2i} s_{2i} + x_{2i}) + x_{2i+1}
        carried, total = _tree_levels(plus(x1, a1, x0), product(a1, a0), m, reverse, dense)
        pieces = [carried, plus(x0, a0, carried)]  # entering slot 2i, entering slot 2i+1
    out = torch.stack(pieces, dim=1).view(m, -1, *x.shape[1:])
    return out[:, :n].reshape(-1, *x.shape[1:]), total


def _identity(a: torch.Tensor, m: int, dense: bool) -> torch.Tensor:
    """[m, 1, ...] identity transitions shaped like a's rows."""
    if not dense:
        return a.new_ones(m, 1, *a.shape[1:])
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(m, 1, *a.shape[1:])


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{m < n} x_m along `dim`, formed without subtracting (no cancellation)."""
    n = x.shape[dim]
    # autograd and torch.compile cannot see through out= into a view
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
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
