"""logscan: the incoming states by recursive doubling over the slots (Hillis–Steele), in
⌈log2(slots)⌉ rounds, for every transition kind.

A slot's summary is the affine map (A_t, M_t) of the state entering it, and maps compose
associatively: (A2, M2) after (A1, M1) is (A2 A1, A2 M1 + M2) (a K x K product for the delta
rule's dense transitions, element-wise for scalar and diagonal ones). Each slot keeps two
windows of consecutive slots: the inclusive one I (ending with itself) and the exclusive one E
(ending just before it). In round r every slot s sends its I to slot s + 2^r and composes the
I it receives from slot s − 2^r onto both of its windows, so after ⌈log2 n⌉ rounds E covers
every earlier slot and its state part is S_in(s). A round is one batch of point-to-point
transfers (between two slots of one rank: a local hand-over), every message one window
(A, M): B·H·(K·V + Kg) values (B·H·K·(V + K) for the delta rule). The first round leaves
before the local intra-chunk compute; the others run when the engine waits, after it. The
backward runs the same scan over the slots in reverse with the transposed transitions and each
slot's gradient on its incoming state as its M (the gradient leaving slot s is
d_{s+1} + A_{s+1}^T (the gradient leaving slot s+1)); the bidirectional sum is a prefix and a
suffix doubling of partial sums over the ranks. Bytes through a rank grow like log W.
"""
from __future__ import annotations

import functools

import torch

from ..ops.delta_checks import DELTA_DECAY_REASON, DELTA_DECAYS
from ..ops.precision import without_autocast
from .comm import exchange_batch
from .delta import delta_by_state_passing
from .engine import Pending, broadcast_last_slot, carried_and_kept, linear_by_state_passing
from .layout import Layout
from .spec import DELTA, LAST_SLOT_BROADCAST, LINEAR, Comm, MethodSpec, Plan
from .transitions import IDENTITY, Transition


class _DoublingPass:
    """One exclusive scan by recursive doubling over n slots in scan order.

    owner: the rank holding each slot, in scan order; mine: (index in this rank's stack, the
    slot's position in scan order) for each of this rank's slots; local [S*B, ...] their M,
    a [S*B, ...] or None their transitions (A applied to M's rows). The first round starts
    at construction; `wait()` runs the rest -> the state part of each slot's exclusive window,
    stacked [S*B, ...] (zeros for the first slot)."""

    def __init__(self, group, rank: int, transition: Transition, local: torch.Tensor, a, owner, mine, tag_base=0):
        S = len(mine)
        self.group, self.rank, self.transition, self.owner, self.mine = group, rank, transition, owner, mine
        self.tag_base = tag_base
        states = local.view(S, -1, *local.shape[1:])
        decays = [None] * S if a is None else list(a.view(S, -1, *a.shape[1:]))
        self.inclusive = [(decays[i], states[i]) for i in range(S)]
        self.exclusive = [None] * S
        self.distance = 1
        self._start_round()

    def _pack(self, window) -> torch.Tensor:
        a, state = window
        return torch.cat([state.reshape(-1), *self.transition.pack(a)])

    def _unpack(self, flat: torch.Tensor, like):
        a, state = like
        n = state.numel()
        return (None if a is None else flat[n:].view(a.shape)), flat[:n].view(state.shape)

    def _compose(self, later, earlier):
        """(A_l, M_l) after (A_e, M_e): (A_l A_e, A_l M_e + M_l)."""
        (a_l, m_l), (a_e, m_e) = later, earlier
        return self.transition.compose(a_l, a_e), self.transition.apply(a_l, m_e) + m_l

    def _start_round(self) -> None:
        """Sends every inclusive window to the slot `distance` later, receives the one from the
        slot `distance` earlier (hand-overs between this rank's own slots copy nothing)."""
        d, n, position_of = self.distance, len(self.owner), {pos: index for index, pos in self.mine}
        sends, receives, self.arriving = [], [], []
        for index, pos in self.mine:
            if pos + d < n and self.owner[pos + d] != self.rank:
                sends.append((self._pack(self.inclusive[index]), self.owner[pos + d], self.tag_base + pos + d))
            if pos - d >= 0:  # (index, the window handed over locally, or where it arrives)
                if self.owner[pos - d] == self.rank:
                    self.arriving.append((index, self.inclusive[position_of[pos - d]], None))
                else:
                    receives.append((self._pack(self.inclusive[index]), self.owner[pos - d], self.tag_base + pos))
                    self.arriving.append((index, None, len(receives) - 1))
        self.received, self.work = exchange_batch(sends, receives, self.group)

    def _finish_round(self) -> None:
        self.work.wait()
        for index, window, arrived in self.arriving:
            if window is None:
                window = self._unpack(self.received[arrived], self.inclusive[index])
            self.exclusive[index] = window if self.exclusive[index] is None else self._compose(self.exclusive[index], window)
            self.inclusive[index] = self._compose(self.inclusive[index], window)
        self.distance *= 2

    def wait(self) -> torch.Tensor:
        self._finish_round()
        while self.distance < len(self.owner):
            self._start_round()
            self._finish_round()
        return torch.cat([torch.zeros_like(m) if window is None else window[1]
                          for window, (_, m) in zip(self.exclusive, self.inclusive)])


class DoublingScan:
    """The exchange of logscan (`engine.Exchange`): recursive doubling over the slots, forward
    in sequence order, backward in reverse with the transposed transitions."""

    keeps_final = False

    def __init__(self, group, layout: Layout, transition: Transition):
        self.group, self.layout, self.transition = group, layout, transition
        self.rank, self.world = torch.distributed.get_rank(group), layout.world
        self.slots_per_rank = layout.slots_per_rank

    def final_state(self, leaving):
        """The last slot's rank broadcasts the state after it."""
        return broadcast_last_slot(self.group, self.layout, leaving)

    def _order(self, reverse: bool):
        """(owner of each slot in scan order, this rank's (index, position in scan order))."""
        owner = self.layout.slot_ranks()
        n = len(owner)
        mine = [(index, n - 1 - slot if reverse else slot) for index, slot in enumerate(self.layout.slots(self.rank))]
        return (owner[::-1] if reverse else owner), mine

    def start_forward(self, h_end, a):
        """wait() -> (S_in, this rank's slots' transitions, which the backward scans with)."""
        scan = _DoublingPass(self.group, self.rank, self.transition, h_end, a, *self._order(False))
        return Pending([], functools.partial(carried_and_kept, scan, a))

    def start_backward(self, d_in, transitions):
        transposed = None if transitions is None else self.transition.transposed(transitions)
        return Pending([], _DoublingPass(self.group, self.rank, self.transition, d_in, transposed,
                                         *self._order(True)).wait)

    def start_sum(self, local):
        """The sum of the other ranks' `local`: an exclusive prefix doubling of partial sums over
        the ranks, then an exclusive suffix one; the prefix's first round starts now."""
        prefix = _DoublingPass(self.group, self.rank, IDENTITY, local, None, list(range(self.world)),
                               [(0, self.rank)])
        return Pending([], functools.partial(self._finish_sum, prefix, local))

    def _finish_sum(self, prefix: _DoublingPass, local: torch.Tensor) -> torch.Tensor:
        before = prefix.wait()
        suffix = _DoublingPass(self.group, self.rank, IDENTITY, local, None, list(range(self.world))[::-1],
                               [(0, self.world - 1 - self.rank)])
        return before + suffix.wait()


@without_autocast
def logscan_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                        validate=False, layout="contiguous", cu_seqlens=None,
                        output_final_state=False):
    """logscan sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the incoming states formed by recursive doubling over the slots.
    The communication is `SPEC.plan` (the README's method table)."""
    return linear_by_state_passing(SPEC, DoublingScan, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                                   chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens,
                                   output_final_state=output_final_state)


@without_autocast
def logscan_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                       validate=False, cu_seqlens=None,
                       output_final_state=False):
    """logscan for the delta rule: the signature and results of `lasp2_delta_rule`, the
    incoming states formed by recursive doubling over the slots, composing the dense K x K maps.
    The communication is `DELTA_SPEC.plan`."""
    return delta_by_state_passing(DELTA_SPEC, DoublingScan, q, k, v, beta, log_decay, scale=scale, group=group,
                                  layout=layout, chunk_size=chunk_size, validate=validate, cu_seqlens=cu_seqlens,
                                  output_final_state=output_final_state)


def _doubling(values: str, chain: str, over: str = "slots") -> Comm:
    return Comm("send", values, "⌈log2(S·W)⌉" if over == "slots" else "⌈log2(W)⌉", chain=chain, over=over,
                route="doubling")


_PREFIX_AND_SUFFIX = (_doubling("B·H·K·V", "up", "ranks"), _doubling("B·H·K·V", "down", "ranks"))
SPEC = MethodSpec(
    name="logscan", family=LINEAR, fn=logscan_linear_attn, equal_shards=False, final_state=LAST_SLOT_BROADCAST,
    plan=Plan(forward=(_doubling("B·H·(K·V + Kg)", "up"),), backward=(_doubling("B·H·(K·V + Kg)", "down"),),
              steps="2·⌈log2(S·W)⌉", overlap="the intra-chunk compute for the first round"),
    bidirectional=Plan(forward=_PREFIX_AND_SUFFIX, backward=_PREFIX_AND_SUFFIX, steps="4·⌈log2(W)⌉"),
    notes="a slot sends its window to the slots 1, 2, 4, ... after it; bytes through a rank grow like log W",
)
DELTA_SPEC = MethodSpec(
    name="logscan", family=DELTA, fn=logscan_delta_rule, equal_shards=False, decays=DELTA_DECAYS,
    final_state=LAST_SLOT_BROADCAST,
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(_doubling("B·H·K·(V + K)", "up"),), backward=(_doubling("B·H·K·(V + K)", "down"),),
              steps="2·⌈log2(S·W)⌉", overlap="the outputs from a zero state for the first round"),
    notes="H: value heads; windows compose the dense K×K maps (K³ per composition and head)",
)
