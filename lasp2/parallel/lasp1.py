"""LASP-1, the baseline LASP-2 replaces: the K x V state travels rank to rank with blocking P2P.

Causal forward: rank t receives S_in(t) from rank t-1, sends S_out = A_t S_in(t) + M_t to rank
t+1, then computes its outputs: W-1 dependent hops. Causal backward: rank t receives dS_out from
rank t+1 and sends dS_in(t) = (its outputs' gradient on S_in) + A_t dS_out to rank t-1: W-1 hops.
Bidirectional: a prefix chain (0 -> W-1) then a suffix chain (W-1 -> 0) of partial sums, so
2(W-1) sends per pass. Same bytes as LASP-2, serialized latency.
"""
from __future__ import annotations

import torch

from ..ops.precision import without_autocast
from ..ops import bidirectional as bi
from ..ops.boundary import apply_total_decay, final_state_grads, initial_state_grads, initial_state_output, total_decay
from ..ops.chunk_kernels import grad_pass, grad_state_pass, output_pass, state_pass
from ..ops.chunk_layout import ChunkedSeq
from .comm import group_rank_size, recv_from, send_to
from .inputs import run_linear_method
from .layout import from_segments, segments, to_segments, unsegment_grads


def _relay(local: torch.Tensor, group, rank: int, world: int, forward: bool, combine) -> torch.Tensor:
    """One chain of blocking hops along the ranks (forward: 0 -> W-1, else W-1 -> 0): receive
    the carry from the previous rank in the chain (zeros at its head), send combine(carry) on.
    Returns the received carry."""
    prev, nxt = (rank - 1, rank + 1) if forward else (rank + 1, rank - 1)
    carry = recv_from(local, group, prev) if 0 <= prev < world else torch.zeros_like(local)
    if 0 <= nxt < world:
        send_to(combine(carry), group, nxt)
    return carry


def _relay_slots(local: torch.Tensor, decay, group, lay, rank: int, forward: bool) -> torch.Tensor:
    """A chain through the layout's slots in sequence order (or reverse): each slot receives the
    carry from the neighbouring slot's owner (handed over locally when this rank owns both),
    and passes local + decay * carry on. local: [S*B, ...] this rank's slots stacked, decay
    [S*B, H, Kg] or None. Returns the carry that entered each of this rank's slots."""
    S = lay.slots_per_rank
    per_slot = local.view(S, -1, *local.shape[1:])
    decays = None if decay is None else decay.view(S, -1, *decay.shape[1:])
    owner, step = lay.slot_owner(), 1 if forward else -1
    order = list(enumerate(lay.slots(rank)))
    carried, handed_over = [None] * S, None
    for index, slot in (order if forward else order[::-1]):
        before, after = slot - step, slot + step
        if not 0 <= before < lay.n_slots:
            carry = torch.zeros_like(per_slot[index])
        elif owner[before][0] == rank:
            carry = handed_over
        else:
            carry = recv_from(per_slot[index], group, owner[before][0])
        carried[index] = carry
        out = per_slot[index] + apply_total_decay(None if decays is None else decays[index], carry)
        if 0 <= after < lay.n_slots:
            if owner[after][0] == rank:
                handed_over = out
            else:
                send_to(out, group, owner[after][0])
    return torch.cat(carried)


class _Lasp1Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, kind, scale, chunk_size, group, lay):
        rank = group_rank_size(group)[0]
        S = lay.slots_per_rank
        seg = segments(q, k, v, log_decay, S)
        x = ChunkedSeq.from_inputs(*seg, kind, chunk_size)
        h_start, local_state = state_pass(x)
        incoming = _relay_slots(local_state, total_decay(x), group, lay, rank, forward=True)
        o = output_pass(x, h_start, scale) + initial_state_output(x, incoming, scale)
        x.save_for_backward(ctx, *seg, incoming)
        ctx.scale, ctx.group, ctx.lay = scale, group, lay
        return from_segments(x.unchunk(o, q.dtype), S)

    @staticmethod
    @without_autocast
    def backward(ctx, do):
        x, (incoming,) = ChunkedSeq.from_ctx(ctx)
        group, lay = ctx.group, ctx.lay
        rank, S = group_rank_size(group)[0], lay.slots_per_rank
        do_hat = x.output_grad(to_segments(do, S), ctx.scale)
        delta_after, d_incoming = grad_state_pass(x, do_hat)
        d_outgoing = _relay_slots(d_incoming, total_decay(x), group, lay, rank, forward=False)
        h_start, _ = state_pass(x)
        dq, dk, dv, dg = grad_pass(x, do_hat, h_start, delta_after)
        dq_in, dg_in = initial_state_grads(x, do_hat, incoming)
        dk_out, dv_out, dg_out, _ = final_state_grads(x, d_outgoing, incoming)
        dg = None if dg is None else dg + dg_in + dg_out
        grads = x.input_grads(dq + dq_in, dk + dk_out, dv + dv_out, dg)
        return (*unsegment_grads(grads, S), None, None, None, None, None)


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
    @without_autocast
    def backward(ctx, do):
        q, k, v, total = ctx.saved_tensors
        scale, group = ctx.meta
        rank, world = group_rank_size(group)
        d_local = bi.state_grad(q, do, scale)
        d_total = d_local + _sum_over_ranks(d_local, group, rank, world)
        dk, dv = bi.key_value_grads(k, v, d_total)
        return bi.query_grad(do, total, scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _lasp1(q, k, v, log_decay, *, kind, scale, causal, chunk_size, group, layout):
    if not causal:  # every token sees every state: the layout does not matter
        return _Lasp1Bidirectional.apply(q, k, v, scale, group)
    return _Lasp1Causal.apply(q, k, v, log_decay, kind, scale, chunk_size, group, layout)


def lasp1_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                      validate=False, layout="contiguous"):
    """LASP-1 sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the state relayed slot to slot by blocking send/recv instead of
    all-gathered.

    Causal, per pass across the group: W-1 dependent sends (contiguous: every rank but the last
    sends forward, every rank but the first sends backward) or 2W-2 (zigzag: the chain runs
    0 -> W-1 and back), B*H*K*V values each, no all-gather. Bidirectional: 2(W-1) sends.
    """
    return run_linear_method(
        "lasp1_linear_attn", _lasp1, q, k, v, log_decay, scale=scale, causal=causal, group=group,
        chunk_size=chunk_size, validate=validate, layout=layout,
    )
