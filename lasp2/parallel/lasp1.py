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

import functools

import torch

from ..ops.precision import without_autocast
from .comm import irecv, isend
from .engine import Pending, broadcast_last_slot, carried_and_kept, linear_by_state_passing
from .layout import Layout
from .spec import LAST_SLOT_BROADCAST, LINEAR, Comm, MethodSpec, Plan
from .transitions import IDENTITY, Transition


class _ChainPass:
    """One pass of a chain through the slots: each slot's carry comes from the neighbouring
    slot (handed over locally when this rank holds both), and the slot passes
    local + apply(a, carry) on, cut into `blocks` column blocks (the columns of a state are
    independent under every transition kind, so a block is combined and forwarded as soon as it
    arrives: blocks > 1 pipelines the chain).

    Every rank issues its sends and receives in chain order (each pair of ranks then matches
    them in the same order, as NCCL requires). The hops that need no remote carry (the chain's
    first slot, and what follows it on the same rank) go out at construction, before the local
    compute; the rest when `wait()` is called, after it."""

    def __init__(self, exchange: "Relay", local: torch.Tensor, a, forward: bool, apply, order=None):
        """local [S*B, ...] this rank's slots stacked, a [S*B, H, Kg] (or [S*B, H, K, K]) or None;
        order: (owner rank of each slot in sequence order, this rank's slots) (default: the
        exchange's layout)."""
        owner, mine = order or (exchange.layout.slot_ranks(), exchange.layout.slots(exchange.rank))
        S = len(mine)
        self.exchange, self.owner, self.apply, self.step = exchange, owner, apply, 1 if forward else -1
        self.per_slot = local.view(S, -1, *local.shape[1:])
        self.decays = [None] * S if a is None else list(a.view(S, -1, *a.shape[1:]))
        order_in_chain = sorted(enumerate(mine), key=lambda pair: pair[1])
        self.remaining = order_in_chain if forward else order_in_chain[::-1]
        self.carried, self.sends, self.handed_over = [None] * S, [], None
        self._advance(may_receive=False)

    def _columns(self, like: torch.Tensor) -> list[slice]:
        width, blocks = like.shape[-1], self.exchange.blocks
        return [slice(width * b // blocks, width * (b + 1) // blocks) for b in range(blocks)]

    def _advance(self, may_receive: bool) -> None:
        rank, n_slots = self.exchange.rank, len(self.owner)
        while self.remaining:
            index, slot = self.remaining[0]
            before, after = slot - self.step, slot + self.step
            local, decay = self.per_slot[index], self.decays[index]
            remote_after = self.owner[after] if 0 <= after < n_slots and self.owner[after] != rank else None
            if 0 <= before < n_slots and self.owner[before] != rank:
                if not may_receive:
                    return
                carry, out = self._receive_and_forward(local, decay, self.owner[before], slot, after, remote_after)
            else:
                carry = torch.zeros_like(local) if not 0 <= before < n_slots else self.handed_over
                out = local + self.apply(decay, carry)  # S_out = A_t S_in + M_t
                if remote_after is not None:
                    for b, cols in enumerate(self._columns(out)):
                        self.sends.append(isend(out[..., cols], self.exchange.group, remote_after, self._tag(after, b)))
            self.remaining.pop(0)
            self.carried[index] = carry
            self.handed_over = out

    def _receive_and_forward(self, local, decay, source: int, slot: int, after: int, remote_after):
        """Receives the carry block by block (all blocks posted first), combining and forwarding
        each as it arrives. -> (carry, out)."""
        columns = self._columns(local)
        posted = [irecv(local[..., cols], self.exchange.group, source, self._tag(slot, b)) for b, cols in enumerate(columns)]
        carry_blocks, out_blocks = [], []
        for b, (cols, (block, work)) in enumerate(zip(columns, posted)):
            work.wait()
            out_block = local[..., cols] + self.apply(decay, block)
            if remote_after is not None:
                self.sends.append(isend(out_block, self.exchange.group, remote_after, self._tag(after, b)))
            carry_blocks.append(block)
            out_blocks.append(out_block)
        return torch.cat(carry_blocks, dim=-1), torch.cat(out_blocks, dim=-1)

    def _tag(self, slot: int, block: int) -> int:
        return slot * self.exchange.blocks + block

    def wait(self) -> torch.Tensor:
        """-> the carry that entered each of this rank's slots, stacked [S*B, ...]."""
        self._advance(may_receive=True)
        for work in self.sends:
            work.wait()
        return torch.cat(self.carried)


class Relay:
    """The exchange of LASP-1 (`engine.Exchange`): a chain through the slots in sequence order
    (forward) or in reverse (backward); blocks > 1 pipelines it (`allscan`)."""

    keeps_final = False

    def __init__(self, group, layout: Layout, transition: Transition, blocks: int = 1):
        self.group, self.layout, self.transition, self.blocks = group, layout, transition, blocks
        self.rank, self.world = torch.distributed.get_rank(group), layout.world
        self.slots_per_rank = layout.slots_per_rank

    def final_state(self, leaving):
        """The last slot's rank broadcasts the state after it."""
        return broadcast_last_slot(self.group, self.layout, leaving)

    def start_forward(self, h_end, a):
        """wait() -> (S_in, this rank's slots' transitions, which the backward relays through)."""
        return Pending([], functools.partial(carried_and_kept, _ChainPass(self, h_end, a, True, self.transition.apply), a))

    def start_backward(self, d_in, transitions):
        return Pending([], _ChainPass(self, d_in, transitions, False, self.transition.apply_transposed).wait)

    def start_sum(self, local):
        """The sum of the other ranks' `local`: a prefix chain 0 -> W−1 of partial sums, then a
        suffix chain W−1 -> 0, in that order on every rank (a pair of ranks then issues its sends
        and receives in one order); rank 0 starts the prefix chain now."""
        prefix = _ChainPass(self, local, None, True, IDENTITY.apply, self._rank_chain())
        return Pending([], functools.partial(self._finish_sum, prefix, local))

    def _rank_chain(self):
        return list(range(self.world)), (self.rank,)

    def _finish_sum(self, prefix: _ChainPass, local: torch.Tensor) -> torch.Tensor:
        before = prefix.wait()
        return before + _ChainPass(self, local, None, False, IDENTITY.apply, self._rank_chain()).wait()


@without_autocast
def lasp1_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                      validate=False, layout="contiguous", cu_seqlens=None,
                      output_final_state=False):
    """LASP-1 sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the state relayed slot to slot by point-to-point sends instead of
    all-gathered. The communication is `SPEC.plan` (the README's method table)."""
    return linear_by_state_passing(SPEC, Relay, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                                   chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens,
                                   output_final_state=output_final_state)


_PREFIX_AND_SUFFIX = (Comm("send", "B·H·K·V", "W−1", chain="up", over="ranks"),
                      Comm("send", "B·H·K·V", "W−1", chain="down", over="ranks"))
SPEC = MethodSpec(
    name="lasp1", family=LINEAR, fn=lasp1_linear_attn, equal_shards=False, final_state=LAST_SLOT_BROADCAST,
    plan=Plan(forward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="up"),),
              backward=(Comm("send", "B·H·K·V", "S·(W−1)", chain="down"),),
              steps="2·S·(W−1)", overlap="the intra-chunk compute for the first hop only (a chain)"),
    bidirectional=Plan(forward=_PREFIX_AND_SUFFIX, backward=_PREFIX_AND_SUFFIX, steps="4·(W−1)"),
    notes="the state relayed by dependent hops",
)
