"""LASP-1, the baseline LASP-2 replaces: the K x V state travels rank to rank with blocking P2P.

Causal forward: rank t receives S_in(t) from rank t-1, sends S_out = A_t S_in(t) + M_t to rank
t+1, then computes its outputs: W-1 dependent hops. Causal backward: rank t receives dS_out from
rank t+1 and sends dS_in(t) = (its outputs' gradient on S_in) + A_t dS_out to rank t-1: W-1 hops.
Bidirectional: a prefix chain (0 -> W-1) then a suffix chain (W-1 -> 0) of partial sums, so
2(W-1) sends per pass. Same bytes as LASP-2, serialized latency.
"""
from __future__ import annotations

import torch

from ..ops import bidirectional as bi
from ..ops.boundary import apply_total_decay, final_state_grads, initial_state_grads, initial_state_output, total_decay
from ..ops.chunk_kernels import grad_pass, grad_state_pass, output_pass, state_pass
from ..ops.chunk_layout import ChunkedSeq
from .comm import group_rank_size, recv_from, send_to
from .inputs import run_linear_method


def _relay(local: torch.Tensor, group, rank: int, world: int, forward: bool, combine) -> torch.Tensor:
    """One chain of blocking hops along the ranks (forward: 0 -> W-1, else W-1 -> 0): receive
    the carry from the previous rank in the chain (zeros at its head), send combine(carry) on.
    Returns the received carry."""
    prev, nxt = (rank - 1, rank + 1) if forward else (rank + 1, rank - 1)
    carry = recv_from(local, group, prev) if 0 <= prev < world else torch.zeros_like(local)
    if 0 <= nxt < world:
        send_to(combine(carry), group, nxt)
    return carry


class _Lasp1Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, kind, scale, chunk_size, group):
        rank, world = group_rank_size(group)
        x = ChunkedSeq.from_inputs(q, k, v, log_decay, kind, chunk_size)
        h_start, local_state = state_pass(x)
        decay = total_decay(x)
        incoming = _relay(local_state, group, rank, world, True, lambda s: local_state + apply_total_decay(decay, s))
        o = output_pass(x, h_start, scale) + initial_state_output(x, incoming, scale)
        x.save_for_backward(ctx, q, k, v, log_decay, incoming)
        ctx.scale, ctx.group = scale, group
        return x.unchunk(o, q.dtype)

    @staticmethod
    def backward(ctx, do):
        x, (incoming,) = ChunkedSeq.from_ctx(ctx)
        rank, world = group_rank_size(ctx.group)
        do_hat = x.output_grad(do, ctx.scale)
        delta_after, d_incoming = grad_state_pass(x, do_hat)
        decay = total_decay(x)
        d_outgoing = _relay(d_incoming, ctx.group, rank, world, False, lambda d: d_incoming + apply_total_decay(decay, d))
        h_start, _ = state_pass(x)
        dq, dk, dv, dg = grad_pass(x, do_hat, h_start, delta_after)
        dq_in, dg_in = initial_state_grads(x, do_hat, incoming)
        dk_out, dv_out, dg_out, _ = final_state_grads(x, d_outgoing, incoming)
        dg = None if dg is None else dg + dg_in + dg_out
        return *x.input_grads(dq + dq_in, dk + dk_out, dv + dv_out, dg), None, None, None, None


def _sum_over_ranks(local: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """sum over ranks s != rank of their `local`, by a prefix chain then a suffix chain."""
    before = _relay(local, group, rank, world, True, lambda s: s + local)
    after = _relay(local, group, rank, world, False, lambda s: s + local)
    return before + after


class _Lasp1Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        rank, world = group_rank_size(group)
        local_state = bi.local_state(k, v)
        total = local_state + _sum_over_ranks(local_state, group, rank, world)
        ctx.save_for_backward(q, k, v, total)
        ctx.meta = (scale, group)
        return bi.state_output(q, total, scale).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, total = ctx.saved_tensors
        scale, group = ctx.meta
        rank, world = group_rank_size(group)
        d_local = bi.state_grad(q, do, scale)
        d_total = d_local + _sum_over_ranks(d_local, group, rank, world)
        dk, dv = bi.key_value_grads(k, v, d_total)
        return bi.query_grad(do, total, scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def lasp1_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64, validate=False):
    """LASP-1 sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the state relayed by blocking send/recv instead of all-gathered.

    Causal: W-1 sends per pass across the group (every rank but the last sends forward, every
    rank but the first sends backward), B*H*K*V values each, no all-gather. Bidirectional:
    2(W-1) sends per pass.
    """
    return run_linear_method(
        "lasp1_linear_attn", _Lasp1Causal, _Lasp1Bidirectional, q, k, v, log_decay,
        scale=scale, causal=causal, group=group, chunk_size=chunk_size, validate=validate,
    )
