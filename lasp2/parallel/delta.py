"""The delta rule (DeltaNet, Gated DeltaNet, KDA) across ranks by state passing: LASP-2 (one
all-gather of slot summaries per pass, as for linear attention, with a dense K x K transition)
and LASP-1 (the running state relayed rank to rank) share one body.

Each slot of C tokens is an affine map of the state entering it, S_out = M S_in + h (h: its
state from zero; M: the product of its chunks' (Γ_L − K̂^T W), `ops.delta_chunk`). A rank
computes its slots' (h, M) and their outputs from a zero state, all-gathers every slot's
(h, M) — S·B·Hv·K·(V + K) values — and composes the earlier slots' into S_in
(`transitions.DENSE.prefix`, in fp32, fp64 for fp64 inputs). S_in's share of the output is then
added chunk by chunk, (Q̃ − P W) (M_before S_in): the chunked op's matmuls on a K x V state. The
backward all-gathers each slot's gradient on S_in (S·B·Hv·K·V values) and composes the later
ones with the transposed maps; everything local is differentiated by autograd.
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops.delta_checks import DELTA_DECAY_REASON, DELTA_DECAYS
from ..ops.delta_chunk import chunk_delta_rule, delta_chunks
from ..ops.precision import without_autocast
from .inputs import check_delta_call
from .lasp1 import _Relay
from .lasp2 import _AllGatherSummaries
from .layout import from_segments, to_segments
from .spec import DELTA, Comm, MethodSpec, Plan
from .transitions import DENSE


class _IncomingStates(torch.autograd.Function):
    """(h, M) of this rank's slots -> the state entering each of them; one all-gather per pass."""

    @staticmethod
    def forward(ctx, h, M, exchange):
        S_in = exchange.start_forward(h, M).wait()
        ctx.save_for_backward(S_in)
        ctx.exchange = exchange
        return S_in

    @staticmethod
    @without_autocast
    def backward(ctx, d_in):
        (S_in,) = ctx.saved_tensors
        d_out = ctx.exchange.start_backward(d_in.contiguous()).wait()  # on each slot's S_out = M S_in + h
        return d_out, d_out @ S_in.transpose(-1, -2), None


def _state_passing(call, q, k, v, beta, log_decay, exchange):
    """This rank's output of the delta rule, its slots' incoming states brought by `exchange`."""
    S = call.layout.slots_per_rank
    seg = [None if t is None else to_segments(t, S) for t in (q, k, v, beta, log_decay)]
    shape = dataclasses.replace(call.shape, batch=S * call.shape.batch, seq_len=call.shape.seq_len // S)
    chunks = delta_chunks(shape, *seg, call.chunk_size)
    outputs, h = chunks.carry(chunks.zero_state())  # each slot from a zero state
    before, M = chunks.transitions()
    S_in = _IncomingStates.apply(h, M, exchange)
    terms = zip(before, *map(chunks.per_chunk, ("qg", "P", "W")))
    for c, (M_before, qg, P, W) in enumerate(terms):  # S_in's share: (Q̃ − P W) M_before S_in
        entering = M_before @ S_in
        outputs[c] = outputs[c] + qg @ entering - P @ (W @ entering)
    return from_segments(chunks.unchunk(outputs, call.scale, v.dtype), S)


@without_autocast
def lasp2_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                     validate=False):
    """LASP-2 sequence-parallel delta rule over the ranks of `group`.

    Args:
        q, k: [B, C, Hk, K] this rank's shard; v: [B, C, Hv, V] with Hv % Hk == 0;
        beta: [B, C, Hv] in [0, 2]; log_decay: None, [B, C, Hv] or [B, C, Hv, K], values <= 0.
        scale: None means 1. group: None or a group of one runs `chunk_delta_rule`.
        layout: "contiguous" or "zigzag". chunk_size: tokens per chunk of the local work.
        validate: check the values and compare shapes across the group first (one small
            all-gather), so that mismatched ranks raise instead of hanging.
    Returns:
        o [B, C, Hv, V], this rank's shard of the output, in v's dtype. The communication is
        `LASP2_SPEC.plan` (the README's method table).
    """
    call = check_delta_call(LASP2_SPEC, q, k, v, beta, log_decay, scale=scale, group=group, chunk_size=chunk_size,
                            validate=validate, layout=layout)
    if call.world == 1:
        return chunk_delta_rule(q, k, v, beta, log_decay, scale=call.scale, chunk_size=call.chunk_size)[0]
    return _state_passing(call, q, k, v, beta, log_decay, _AllGatherSummaries(group, call.layout, DENSE))


@without_autocast
def lasp1_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                     validate=False):
    """LASP-1 for the delta rule, the baseline: the signature and results of `lasp2_delta_rule`,
    with the running state relayed slot to slot (`lasp1._Relay`; the maps stay on their ranks).
    The communication is `LASP1_SPEC.plan`."""
    call = check_delta_call(LASP1_SPEC, q, k, v, beta, log_decay, scale=scale, group=group, chunk_size=chunk_size,
                            validate=validate, layout=layout)
    if call.world == 1:
        return chunk_delta_rule(q, k, v, beta, log_decay, scale=call.scale, chunk_size=call.chunk_size)[0]
    return _state_passing(call, q, k, v, beta, log_decay, _Relay(group, call.layout, DENSE))


LASP2_SPEC = MethodSpec(
    name="lasp2", family=DELTA, fn=lasp2_delta_rule, equal_shards=False, decays=DELTA_DECAYS,
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(Comm("all_gather", "S·B·H·K·(V + K)"),), backward=(Comm("all_gather", "S·B·H·K·V"),),
              steps="2"),
    notes="H: value heads; the slot's dense K×K transition travels with its state; independent of N",
)
LASP1_SPEC = MethodSpec(
    name="lasp1", family=DELTA, fn=lasp1_delta_rule, equal_shards=False, decays=DELTA_DECAYS,
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="up"),),
              backward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="down"),), steps="2·S·(W−1)"),
    notes="H: value heads; the running state relayed by dependent hops",
)
