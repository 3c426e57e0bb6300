"""Collectives with their adjoints, as autograd Functions on per-rank payloads [W, n].

    gather_rows(x [n])        -> [W, n]  forward all-gather,     backward reduce-scatter (sum)
    exchange_rows(x [W, n])   -> [W, n]  forward all-to-all,     backward all-to-all
    (row j of the input goes to rank j; row j of the output came from rank j)

Callers pack whatever travels (K and V, gates, ...) into one flat row per rank, so each pass
issues exactly one collective per call; packing and unpacking stay ordinary differentiable ops.
"""
from __future__ import annotations

import torch

from ..ops.precision import without_autocast
from .comm import all_gather_dim0, all_to_all_dim0, reduce_scatter_dim0
from .layout import to_global_order


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group).view(-1, x.numel())

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad.contiguous().view(-1), ctx.group), None


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_to_all_dim0(x, group)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        return all_to_all_dim0(grad.contiguous(), ctx.group), None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """[n] on every rank -> [W, n]; the gradient of row r returns to rank r, summed over ranks."""
    return _GatherRows.apply(x.reshape(-1), group)


def exchange_rows(x: torch.Tensor, group) -> torch.Tensor:
    """[W, n]: row j goes to rank j -> [W, n]: row j came from rank j."""
    return _ExchangeRows.apply(x.contiguous(), group)


def gather_sequence(tensors: list[torch.Tensor], group, lay) -> list[torch.Tensor]:
    """Every rank's [B, C, ...] shards -> the whole [B, T, ...] sequences in order, with one
    all-gather for all the tensors together (backward: one reduce-scatter)."""
    rows = gather_rows(torch.cat([t.reshape(-1) for t in tensors]), group)  # [W, n]
    out, offset = [], 0
    for t in tensors:
        per_rank = rows[:, offset:offset + t.numel()].reshape(lay.world, *t.shape)
        out.append(to_global_order(per_rank, lay))
        offset += t.numel()
    return out
