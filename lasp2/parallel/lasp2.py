"""LASP-2: sequence-parallel linear attention with one all-gather of slot summaries per pass.

The sequence is cut into slots in order (the layout: one slot per rank, or two for zigzag). Each
rank reduces each of its slots to an affine summary (M_t: its state from a zero incoming state;
A_t: its transition), all-gathers them once, and combines the earlier slots' summaries into its
incoming state S_in = A_{t-1} S_in(t-1) + M_{t-1}; the gather overlaps the intra-chunk compute.
The backward all-gathers each slot's gradient on its incoming state and combines the later ones
with the transposed transitions, overlapped with the recomputed states and query-side
gradients. Scans over slots run in fp32 (fp64 for fp64 inputs). See `engine.py`.
"""
from __future__ import annotations

import torch

from ..ops.precision import without_autocast
from .comm import all_gather_async
from .engine import Pending, linear_by_state_passing
from .layout import Layout, slots_in_order
from .spec import LINEAR, Comm, MethodSpec, Plan
from .transitions import Transition


class AllGatherSummaries:
    """The exchange of LASP-2 (`engine.Exchange`): one all-gather of every slot's (M, A) forward, of every slot's
    gradient on its incoming state backward."""

    keeps_final = False  # set for a prefill: every rank then also combines every slot (`final_state`)

    def __init__(self, group, layout: Layout, transition: Transition):
        self.group, self.layout, self.transition = group, layout, transition
        self.rank = torch.distributed.get_rank(group)
        self.slots_per_rank = layout.slots_per_rank
        self._final = None

    def _in_order(self, rows: torch.Tensor, shape) -> torch.Tensor:
        """Rows of every rank's [S*B, H, ...] pieces -> [B, H, n_slots, ...] in sequence order."""
        S = self.slots_per_rank
        per_rank = rows.reshape(self.layout.world, S, shape[0] // S, *shape[1:])
        return slots_in_order(per_rank, self.layout).movedim(0, 2).contiguous()

    def _mine(self, per_slot: torch.Tensor) -> torch.Tensor:
        """[B, H, n_slots, ...] -> this rank's slots stacked into the batch, [S*B, H, ...]."""
        return torch.cat([per_slot[:, :, s] for s in self.layout.slots(self.rank)])

    def start_forward(self, h_end, a):
        payload = torch.cat([h_end.reshape(-1), *self.transition.pack(a)])
        gathered, work = all_gather_async(payload, self.group)

        def incoming():
            rows = gathered.view(self.layout.world, -1)
            n = h_end.numel()
            states = self._in_order(rows[:, :n], h_end.shape)
            transitions = None if a is None else self._in_order(rows[:, n:], a.shape)  # every slot's A, in order
            entering = self.transition.prefix(states, transitions)
            if self.keeps_final:  # the state after the last slot, from the same summaries
                last = None if transitions is None else transitions[:, :, -1]
                self._final = self.transition.apply(last, entering[:, :, -1]) + states[:, :, -1]
            return self._mine(entering), transitions

        return Pending([work], incoming)

    def final_state(self, leaving):
        """Every rank has every summary: no further communication."""
        return self._final

    def start_backward(self, d_in, transitions):
        gathered, work = all_gather_async(d_in.reshape(-1), self.group)

        def outgoing():
            per_slot = self._in_order(gathered.view(self.layout.world, -1), d_in.shape)
            return self._mine(self.transition.suffix(per_slot, transitions))

        return Pending([work], outgoing)

    def start_sum(self, local):
        gathered, work = all_gather_async(local.reshape(-1), self.group)

        def others():
            rows = gathered.view(self.layout.world, *local.shape)
            return sum(rows[r] for r in range(self.layout.world) if r != self.rank)

        return Pending([work], others)


@without_autocast
def lasp2_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                      validate=False, layout="contiguous", cu_seqlens=None,
                      output_final_state=False):
    """LASP-2 sequence-parallel linear attention over the ranks of `group`.

    Args:
        q: [B, C, H, K] this rank's shard of the queries (rank order = dist.get_rank(group)).
        k: [B, C, H, K] keys, same shard.
        v: [B, C, H, V] values, same shard.
        log_decay: None, [H], [B, C, H] or [B, C, H, K] (this rank's shard), values <= 0; see
            `lasp2.ops.chunk_linear_attn`.
        scale: output multiplier, None means 1.
        causal: False gives the bidirectional form (no decay).
        group: the sequence-parallel process group; None or a group of size 1 runs the
            single-device op with no communication.
        chunk_size: tokens per chunk of the local computation.
        validate: first check the values (log decay <= 0) and compare B, H, K, V, dtype, decay
            form, causal, scale and cu_seqlens across the group with one extra all-gather of 11 float64
            values per rank (one collective latency), so that mismatched ranks raise the same
            ValueError instead of hanging or exchanging wrongly sized buffers. Off by default.
        layout: "contiguous" (shards may differ in length), "zigzag" (even local length) or a slot
            table (`layout.slot_table`: any equal slots to ranks; a local length divisible by its S).
        cu_seqlens: None, or the [N + 1] int64 offsets (or `lasp2.ops.Documents`, which costs no
            host read) of N documents packed in the global row
            (B = 1; the same tensor on every rank, each rank an equal shard): each document is
            computed alone, documents may cross any slot edge, with the same collectives (no-decay
            and [H] forms then run as per-token decays, whose transitions add S·B·H values).
        output_final_state: also return the state after the whole sequence (inference: the
            prefill of generation; no gradient, causal, no cu_seqlens). Every rank combines it
            from the summaries it gathered anyway: no further communication.

    Returns:
        o [B, C, H, V], this rank's shard of the output, in q's dtype (with output_final_state:
        (o, final_state [B, H, K, V] in fp32, fp64 for fp64 inputs, the same on every rank)). The
        communication is `SPEC.plan` (the README's method table).
    """
    return linear_by_state_passing(SPEC, AllGatherSummaries, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                                   chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens,
                                   output_final_state=output_final_state)


SPEC = MethodSpec(
    name="lasp2", family=LINEAR, fn=lasp2_linear_attn, equal_shards=False, final_state=(),
    plan=Plan(forward=(Comm("all_gather", "S·B·H·(K·V + Kg)"),), backward=(Comm("all_gather", "S·B·H·K·V"),),
              steps="2", overlap="the intra-chunk compute"),
    bidirectional=Plan(forward=(Comm("all_gather", "B·H·K·V"),), backward=(Comm("all_gather", "B·H·K·V"),), steps="2"),
    notes="independent of N; packed documents (cu_seqlens) count the none and [H] forms as [B,T,H]",
)
