"""LASP-1, the baseline LASP-2 replaces: the running state is relayed slot to slot, rank to rank.

Causal forward: each slot receives the state entering it from the rank holding the slot before
(zeros for the first slot), passes A_t S_in + M_t on to the rank holding the next one: a chain of
dependent hops (W−1 for contiguous shards, 2W−2 for zigzag, whose chain runs 0 -> W−1 and
back). The hops that need no remote state (the chain's first) leave before the local
intra-chunk compute; every later hop waits for its rank to finish that compute and then for the
previous rank, so the chain's latency adds to the compute (the serialization LASP-2 removes).
The backward relays the gradient on each slot's outgoing state the other way. Bidirectional: a
prefix chain and a suffix chain of partial sums, 2(W−1) sends per pass. Same bytes as LASP-2,
serialized latency. The math is LASP-2's (`engine.py`); only the exchange differs.
"""
from __future__ import annotations

import torch

from ..ops.chunk import chunk_linear_attn
from ..ops.precision import without_autocast
from .comm import irecv, isend
from .engine import Pending, bidirectional_state_passing, causal_state_passing
from .inputs import check_linear_call
from .layout import Layout
from .spec import LINEAR, Comm, MethodSpec, Plan
from .transitions import Transition, transition_for

PREFIX_TAG, SUFFIX_TAG = 0, 1


class _Relay:
    """The exchange of LASP-1: a chain through the slots in sequence order (forward) or in
    reverse (backward)."""

    def __init__(self, group, layout: Layout, transition: Transition):
        self.group, self.layout, self.transition = group, layout, transition
        self.rank, self.world = torch.distributed.get_rank(group), layout.world
        self.slots_per_rank = layout.slots_per_rank

    def _receive(self, like: torch.Tensor, group_rank: int, tag: int) -> torch.Tensor:
        received, work = irecv(like, self.group, group_rank, tag)
        work.wait()
        return received

    def _chain(self, local: torch.Tensor, a, forward: bool, apply) -> Pending:
        """local [S*B, ...] this rank's slots stacked, a [S*B, H, Kg] or None. Each slot's carry
        comes from the neighbouring slot (handed over locally when this rank holds both); the
        slot passes local + apply(a, carry) on. wait() -> the carry that entered each slot.

        Every rank issues its sends and receives in chain order (each pair of ranks then
        matches them in the same order, as NCCL requires). The hops that need no remote carry
        (the chain's first slot, and what follows it on the same rank) go out now, before the
        local compute; the rest run when the engine waits, after it."""
        S, owner, n_slots = self.slots_per_rank, self.layout.slot_owner(), self.layout.n_slots
        per_slot = local.view(S, -1, *local.shape[1:])
        decays = [None] * S if a is None else list(a.view(S, -1, *a.shape[1:]))
        step = 1 if forward else -1
        order = list(enumerate(self.layout.slots(self.rank)))
        remaining = order if forward else order[::-1]
        carried, sends, handed_over = [None] * S, [], [None]

        def advance(may_receive: bool) -> None:
            while remaining:
                index, slot = remaining[0]
                before, after = slot - step, slot + step
                if not 0 <= before < n_slots:
                    carry = torch.zeros_like(per_slot[index])
                elif owner[before][0] == self.rank:
                    carry = handed_over[0]
                elif may_receive:
                    carry = self._receive(per_slot[index], owner[before][0], tag=slot)
                else:
                    return
                remaining.pop(0)
                carried[index] = carry
                out = per_slot[index] + apply(decays[index], carry)  # S_out = A_t S_in + M_t
                if 0 <= after < n_slots:
                    if owner[after][0] == self.rank:
                        handed_over[0] = out
                    else:
                        sends.append(isend(out, self.group, owner[after][0], tag=after))

        advance(may_receive=False)

        def relay():
            advance(may_receive=True)
            for work in sends:
                work.wait()
            return torch.cat(carried)

        return Pending([], relay)

    def start_forward(self, h_end, a):
        """wait() -> (S_in, this rank's slots' transitions, which the backward relays through)."""
        chain = self._chain(h_end, a, True, self.transition.apply)
        return Pending([], lambda: (chain.wait(), a))

    def start_backward(self, d_in, transitions):
        return self._chain(d_in, transitions, False, self.transition.apply_transposed)

    def start_sum(self, local):
        """The sum of the other ranks' `local`: a prefix chain 0 -> W−1 of partial sums, then a
        suffix chain W−1 -> 0, in that order on every rank; rank 0 starts the prefix chain now."""
        rank, world, sends = self.rank, self.world, []

        def pass_on(carry, nxt: int, tag: int) -> None:
            if 0 <= nxt < world:
                sends.append(isend(carry + local, self.group, nxt, tag))

        prefix = torch.zeros_like(local) if rank == 0 else None
        if prefix is not None:
            pass_on(prefix, rank + 1, PREFIX_TAG)

        def relay():
            before = prefix if prefix is not None else self._receive(local, rank - 1, PREFIX_TAG)
            if prefix is None:
                pass_on(before, rank + 1, PREFIX_TAG)
            after = torch.zeros_like(local) if rank == world - 1 else self._receive(local, rank + 1, SUFFIX_TAG)
            pass_on(after, rank - 1, SUFFIX_TAG)
            for work in sends:
                work.wait()
            return before + after

        return Pending([], relay)


@without_autocast
def lasp1_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                      validate=False, layout="contiguous", cu_seqlens=None):
    """LASP-1 sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the state relayed slot to slot by point-to-point sends instead of
    all-gathered. The communication is `SPEC.plan` (the README's method table)."""
    call = check_linear_call(SPEC, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                             chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                                 cu_seqlens=call.documents)[0]
    log_decay, kind = call.linear_decay(log_decay, q.dtype)  # packed documents: resets as decays
    exchange = _Relay(group, call.layout, transition_for(kind))
    if not causal:
        return bidirectional_state_passing(q, k, v, scale=call.scale, exchange=exchange)
    return causal_state_passing(q, k, v, log_decay, kind=kind, scale=call.scale,
                                chunk_size=call.chunk_size, exchange=exchange)


_PREFIX_AND_SUFFIX = (Comm("send", "B·H·K·V", "W−1", chain="up", over="ranks"),
                      Comm("send", "B·H·K·V", "W−1", chain="down", over="ranks"))
SPEC = MethodSpec(
    name="lasp1", family=LINEAR, fn=lasp1_linear_attn, equal_shards=False,
    plan=Plan(forward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="up"),),
              backward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="down"),),
              steps="2·S·(W−1)", overlap="the intra-chunk compute for the first hop only (a chain)"),
    bidirectional=Plan(forward=_PREFIX_AND_SUFFIX, backward=_PREFIX_AND_SUFFIX, steps="4·(W−1)"),
    notes="the state relayed by dependent hops",
)
