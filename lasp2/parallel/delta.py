"""The delta rule (DeltaNet, Gated DeltaNet, KDA) across ranks by state passing: LASP-2 (one
all-gather of slot summaries per pass, as for linear attention, with a dense K x K transition)
and LASP-1 (the running state relayed rank to rank) share one body.

Each slot of C tokens is an affine map of the state entering it, S_out = M S_in + h (h: its
state from zero; M: the product of its chunks' (Γ_L − K̂^T W), `ops.delta_kernels`). A rank
carries [0 | I] through its slots' chunks, which gives (h | M) in one pass, all-gathers every
slot's (h, M) — S·B·Hv·K·(V + K) values — and composes the earlier slots' into S_in
(`transitions.DENSE.prefix`, in fp32, fp64 for fp64 inputs). S_in's share of the output is then
carried through the slot's chunks (−W S and the chunk's decay per chunk, K x V matmuls) and
added to the outputs in one batched matmul, Qe S. The gather is issued before the outputs from a
zero state are formed, and waited for after. The backward (written out, `ops.delta_kernels`)
all-gathers each slot's gradient on S_in (S·B·Hv·K·V values) while the query-side gradients are
formed, composes the later slots' with the transposed maps saved from the forward, and carries
the result back through the slot's chunks before the key-side gradients.
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops.delta_checks import DELTA_DECAY_REASON, DELTA_DECAYS
from ..ops.delta_chunk import chunk_delta_rule
from ..ops.delta_kernels import (add_query_side, carry, delta_chunks, entering_grads, grad_carry, key_side_grads,
                                 outputs, query_side_grads, rebuild_chunks)
from ..ops.policy import policy_for, under_forward_policy
from ..ops.precision import without_autocast
from .engine import check_final_state_call
from .inputs import check_delta_call
from .lasp1 import Relay
from .lasp2 import AllGatherSummaries
from .layout import from_segments, to_segments
from .spec import DELTA, LAST_SLOT_BROADCAST, Comm, MethodSpec, Plan
from .transitions import DENSE


def _segments(S: int, *tensors):
    """A rank's S slots stacked into the batch, for each of [B, C, ...] tensors (None stays)."""
    return [None if t is None else to_segments(t, S) for t in tensors]


class _StatePassing(torch.autograd.Function):
    """This rank's slots of the delta rule, their incoming states brought by `exchange` (the
    pieces and the math: `ops.delta_kernels`). Keeps, through save_for_backward, the inputs as
    given, the state entering each chunk, the transitions the backward's exchange needs and, as
    the device policy says, the chunks' costly terms; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, shape, scale, chunk_size, exchange, resets, final):
        S = exchange.slots_per_rank
        ctx.policy = policy_for(q.device)
        x = delta_chunks(shape, *_segments(S, q, k, v, beta, log_decay), chunk_size, *_segments(S, resets))
        K, V = shape.key_dim, shape.value_dim
        eye = torch.eye(K, dtype=x.q.dtype, device=x.q.device).expand(*x.q.shape[:2], K, K)
        entering, end = carry(x, torch.cat([x.zero_state(), eye], dim=-1))  # [h | M]: from zero, and the map
        pending = exchange.start_forward(end[..., :V].contiguous(), end[..., V:].contiguous())
        o = outputs(add_query_side(x), entering)  # from a zero state, while the summaries travel
        S_in, transitions = pending.wait()
        incoming, _ = carry(x, S_in, values=False)  # S_in's share of each chunk's entering state
        o = outputs(x, incoming, base=o)
        if final:  # inference only (checked): nothing is saved; S_out = M S_in + h per slot
            leaving = end[..., V:] @ S_in + end[..., :V]
            return from_segments(x.unchunk(scale * o, v.dtype), S), exchange.final_state(leaving)
        ctx.save_for_backward(q, k, v, beta, log_decay, resets, entering + incoming, transitions,
                              *x.kept_for_backward())
        ctx.shape, ctx.scale, ctx.chunk_size, ctx.exchange = shape, scale, chunk_size, exchange
        return from_segments(x.unchunk(scale * o, v.dtype), S)

    @staticmethod
    @without_autocast
    @under_forward_policy
    def backward(ctx, do):
        q, k, v, beta, log_decay, resets, entering, transitions, *kept = ctx.saved_tensors
        exchange = ctx.exchange
        S = exchange.slots_per_rank
        x = rebuild_chunks(ctx.shape, _segments(S, q, k, v, beta, log_decay), ctx.chunk_size, *_segments(S, resets),
                           kept)
        do = x.output_grad(to_segments(do, S), ctx.scale)
        d_leaving, d_in = grad_carry(x, entering_grads(x, do), None)  # each slot's gradient on its S_in
        pending = exchange.start_backward(d_in, transitions)
        grads = query_side_grads(x, do, entering)  # while the gradients travel
        d_out = pending.wait()  # the gradient on each slot's outgoing state
        d_leaving = d_leaving + grad_carry(x, None, d_out)[0]
        grads = key_side_grads(x, entering, d_leaving, *grads)
        return (*(None if g is None else from_segments(g, S).to(t.dtype) for g, t in zip(grads, (q, k, v, beta, log_decay))),
                None, None, None, None, None, None)


def state_passing_delta(call, q, k, v, beta, log_decay, exchange, final: bool = False):
    """This rank's output of the delta rule, its slots' incoming states brought by `exchange`;
    final=True (inference): (output, the state after the whole sequence, on every rank)."""
    S = call.layout.slots_per_rank
    shape = dataclasses.replace(call.shape, batch=S * call.shape.batch, seq_len=call.shape.seq_len // S)
    resets = None if call.packed is None else call.packed.resets
    exchange.keeps_final = final
    return _StatePassing.apply(q, k, v, beta, log_decay, shape, call.scale, call.chunk_size, exchange, resets, final)


def delta_by_state_passing(spec, make_exchange, q, k, v, beta, log_decay, *, scale, group, layout, chunk_size, validate,
                           cu_seqlens, output_final_state=False):
    """The body of every state-passing delta-rule method: the inputs checked against `spec`
    before any collective, one device runs `chunk_delta_rule`, else this rank's slots with
    `make_exchange(group, layout, DENSE)` bringing the states. output_final_state=True:
    (output, final state [B, Hv, K, V], the same on every rank)."""
    call = check_delta_call(spec, q, k, v, beta, log_decay, scale=scale, group=group, chunk_size=chunk_size,
                            validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        out = chunk_delta_rule(q, k, v, beta, log_decay, scale=call.scale, chunk_size=call.chunk_size,
                               cu_seqlens=call.documents, output_final_state=output_final_state)
        return out if output_final_state else out[0]
    check_final_state_call(spec.fn.__name__, output_final_state, (q, k, v, beta, log_decay), True, call.packed)
    return state_passing_delta(call, q, k, v, beta, log_decay, make_exchange(group, call.layout, DENSE),
                               output_final_state)


@without_autocast
def lasp2_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                     validate=False, cu_seqlens=None,
                     output_final_state=False):
    """LASP-2 sequence-parallel delta rule over the ranks of `group`.

    Args:
        q, k: [B, C, Hk, K] this rank's shard; v: [B, C, Hv, V] with Hv % Hk == 0;
        beta: [B, C, Hv] in [0, 2]; log_decay: None, [B, C, Hv] or [B, C, Hv, K], values <= 0.
        scale: None means 1. group: None or a group of one runs `chunk_delta_rule`.
        layout: "contiguous", "zigzag" or a slot table (`layout.slot_table`). chunk_size: tokens per
            chunk of the local work.
        validate: check the values and compare shapes across the group first (one small
            all-gather), so that mismatched ranks raise instead of hanging.
        cu_seqlens: None, or the [N + 1] int64 offsets (or `lasp2.ops.Documents`, which costs no
            host read) of N documents packed in the global row
            (B = 1; the same tensor on every rank, each rank an equal shard): each document is
            computed alone, documents may cross any slot edge; the same collectives and bytes.
        output_final_state: also return the state after the whole sequence (inference: the
            prefill of generation; no gradient, no cu_seqlens), from the gathered summaries.
    Returns:
        o [B, C, Hv, V], this rank's shard of the output, in v's dtype (with output_final_state:
        (o, final_state [B, Hv, K, V] in fp32, fp64 for fp64 inputs, the same on every rank)). The
        communication is `LASP2_SPEC.plan` (the README's method table).
    """
    return delta_by_state_passing(LASP2_SPEC, AllGatherSummaries, q, k, v, beta, log_decay, scale=scale, group=group,
                                  layout=layout, chunk_size=chunk_size, validate=validate, cu_seqlens=cu_seqlens,
                                  output_final_state=output_final_state)


@without_autocast
def lasp1_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                     validate=False, cu_seqlens=None,
                     output_final_state=False):
    """LASP-1 for the delta rule, the baseline: the signature and results of `lasp2_delta_rule`,
    with the running state relayed slot to slot (`lasp1.Relay`; the maps stay on their ranks).
    The communication is `LASP1_SPEC.plan`."""
    return delta_by_state_passing(LASP1_SPEC, Relay, q, k, v, beta, log_decay, scale=scale, group=group, layout=layout,
                                  chunk_size=chunk_size, validate=validate, cu_seqlens=cu_seqlens,
                                  output_final_state=output_final_state)


LASP2_SPEC = MethodSpec(
    name="lasp2", family=DELTA, fn=lasp2_delta_rule, equal_shards=False, decays=DELTA_DECAYS, final_state=(),
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(Comm("all_gather", "S·B·H·K·(V + K)"),), backward=(Comm("all_gather", "S·B·H·K·V"),),
              steps="2", overlap="the outputs from a zero state"),
    notes="H: value heads; the slot's dense K×K transition travels with its state; independent of N",
)
LASP1_SPEC = MethodSpec(
    name="lasp1", family=DELTA, fn=lasp1_delta_rule, equal_shards=False, decays=DELTA_DECAYS,
    final_state=LAST_SLOT_BROADCAST,
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="up"),),
              backward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="down"),), steps="2·S·(W−1)"),
    notes="H: value heads; the running state relayed by dependent hops",
)
