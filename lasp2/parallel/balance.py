"""Balancing packed documents over the sequence-parallel ranks: a document order and a slot table.

A batch of packed documents runs as one sequence cut into W·S equal slots (`layout.slot_table`).
Every document is computed alone, so the documents may run in any order, and any slot may go to
any rank. A rank's cost per layer call is then
    linear and delta layers:  its tokens (S equal slots: the same on every rank),
    softmax layers:           the (query, key) products its kernel computes: each slot's queries
                              against the keys from its first token's document start to the
                              slot's end (the all-gather method's masked kernel; quadratic in a
                              document's length: the long document's ranks did most of it),
    communication:            its state-passing messages and gathered keys (`cost`).
`plan_placement` orders the documents (the longest first, each starting a fresh slot where it can;
the shorter ones packed best-fit into the room left, so that they stay whole inside one slot) and
gives each rank S slots, the costliest slot first to the least loaded rank with room (LPT), for
the S of `slots_per_rank` whose slowest rank is cheapest. Pure arithmetic on lengths: no tensor,
no collective; every rank computes the same plan from the same lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

from .layout import Layout, as_layout, slot_table


@dataclass(frozen=True)
class LayerCosts:
    """Seconds per unit of work of one training step (forward + backward, every layer of a kind):
    per token of the linear and delta layers, per (query, key) product of the softmax layers,
    and per slot a rank holds (its state-passing messages). From the cost model's FLOP counts
    at a calibrated rate (`for_model`), or given."""

    per_token: float
    per_pair: float
    per_slot: float = 0.0

    @classmethod
    def for_model(cls, linear_layers: int, softmax_layers: int, heads: int, head_dim: int, rate: float,
                  slot_seconds: float = 0.0, softmax_rate: float | None = None) -> "LayerCosts":
        """FLOPs as `cost.flops` counts them (chunk 64, backward twice the forward, the softmax
        blocks recomputed: 3.5x) at `rate` FLOP/s (the chunk kernel's), the softmax kernel's at
        `softmax_rate` (None: the same); `lasp2_bench attn` measures both (`rate_chunk`,
        `rate_sdpa_masked` in attn-calibration.json)."""
        chunk = 64
        per_token = linear_layers * 3.0 * heads * (2 * chunk * 2 * head_dim + 4 * head_dim * head_dim) / rate
        per_pair = softmax_layers * 3.5 * heads * 2 * 2 * head_dim / (softmax_rate or rate)
        return cls(per_token, per_pair, slot_seconds)


@dataclass(frozen=True)
class Placement:
    """order: the documents (indices into the lengths given) in the order they run; layout: the
    slot table; cost: each rank's estimated seconds."""

    order: tuple[int, ...]
    layout: Layout
    cost: tuple[float, ...]

    @property
    def imbalance(self) -> float:
        """The slowest rank's cost over the mean."""
        return max(self.cost) / (sum(self.cost) / len(self.cost))


def slot_costs(lengths_in_order, slot_len: int, costs: LayerCosts) -> list[float]:
    """Each slot's cost: its tokens, and its queries against the keys from its first token's
    document start to the slot's end."""
    n_slots = sum(lengths_in_order) // slot_len
    doc_starts, start = [], 0
    for length in lengths_in_order:
        doc_starts.append(start)
        start += length
    costs_out, d = [], 0
    for slot in range(n_slots):
        first = slot * slot_len
        while d + 1 < len(doc_starts) and doc_starts[d + 1] <= first:
            d += 1
        products = slot_len * (first + slot_len - doc_starts[d])
        costs_out.append(slot_len * costs.per_token + products * costs.per_pair + costs.per_slot)
    return costs_out


def rank_costs(layout: Layout, slot_cost: list[float]) -> tuple[float, ...]:
    return tuple(sum(slot_cost[s] for s in layout.slots(rank)) for rank in range(layout.world))


def named_layout_costs(lengths, layout, world: int, costs: LayerCosts) -> tuple[float, ...]:
    """Each rank's cost with the documents in their given order and a layout (a name or a Layout)."""
    layout = as_layout(layout, world)
    return rank_costs(layout, slot_costs(lengths, sum(lengths) // layout.n_slots, costs))


def document_order(lengths, slot_len: int) -> list[int]:
    """The longest documents first (those of a slot or more), then the others packed best-fit
    decreasing into the room left in each slot, so that a short document rarely crosses a slot
    edge; what does not fit whole anywhere runs last."""
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    long = [i for i in by_length if lengths[i] >= slot_len]
    short = [i for i in by_length if lengths[i] < slot_len]
    placed = sum(lengths[i] for i in long)
    n_slots = sum(lengths) // slot_len
    room = [slot_len] * n_slots
    full, rest = divmod(placed, slot_len)
    for s in range(full):
        room[s] = 0
    if full < n_slots:
        room[full] -= rest
    bins: list[list[int]] = [[] for _ in range(n_slots)]
    leftover = []
    for i in short:
        fits = [s for s in range(full, n_slots) if room[s] >= lengths[i]]
        if not fits:
            leftover.append(i)
            continue
        best = min(fits, key=lambda s: room[s] - lengths[i])
        room[best] -= lengths[i]
        bins[best].append(i)
    return long + [i for b in bins for i in b] + leftover


def assign_slots(slot_cost: list[float], world: int) -> Layout:
    """Each rank len(slot_cost) / world slots: the costliest slot first, to the least loaded
    rank that has room (longest processing time first)."""
    per_rank = len(slot_cost) // world
    load, rows = [0.0] * world, [[] for _ in range(world)]
    for s in sorted(range(len(slot_cost)), key=lambda s: -slot_cost[s]):
        rank = min((r for r in range(world) if len(rows[r]) < per_rank), key=lambda r: (load[r], r))
        rows[rank].append(s)
        load[rank] += slot_cost[s]
    return slot_table([sorted(row) for row in rows])


def plan_placement(lengths, world: int, costs: LayerCosts, slots_per_rank=(1, 2, 4, 8),
                   total: int | None = None) -> Placement:
    """The placement of documents of these lengths (their sum divisible by world·S for some S
    given; `total`, when given, the batch's tokens they must fill exactly) with the cheapest
    slowest rank; ValueError naming the rule otherwise."""
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        empty = [i for i, n in enumerate(lengths) if n < 1]
        raise ValueError(f"plan_placement: every document needs at least one token; document(s) {empty[:8]} have none")
    if total is not None:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        if lengths[longest] > total:
            raise ValueError(f"plan_placement: document {longest} has {lengths[longest]} tokens, more than the batch's "
                             f"{total}; cut documents to the batch before placing them")
        if sum(lengths) != total:
            raise ValueError(f"plan_placement: the documents hold {sum(lengths)} tokens, the batch {total}; they must "
                             f"fill it exactly")
    total = sum(lengths)
    candidates = [S for S in slots_per_rank if total % (world * S) == 0]
    if not candidates:
        raise ValueError(f"plan_placement: {total} tokens do not divide into {world} ranks x S equal slots for any S "
                         f"in {tuple(slots_per_rank)}")
    best = None
    for S in candidates:
        slot_len = total // (world * S)
        order = document_order(lengths, slot_len)
        slot_cost = slot_costs([lengths[i] for i in order], slot_len, costs)
        layout = assign_slots(slot_cost, world)
        placement = Placement(tuple(order), layout, rank_costs(layout, slot_cost))
        if best is None or max(placement.cost) < max(best.cost):
            best = placement
    return best
