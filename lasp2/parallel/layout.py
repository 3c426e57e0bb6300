"""How a sequence is cut into per-rank shards, and the helpers that move between the two.

A layout cuts T tokens into `n_slots` equal slots, numbered in sequence order, and gives each
rank some of them, concatenated in increasing slot order:

    contiguous: W slots, rank r holds slot r.
    zigzag:     2W slots, rank r holds slots r and 2W-1-r (head and tail), which balances causal
                softmax work: every rank gets one early and one late slot.
    a table:    W·S slots, rank r holds the S slots of row r of a slot table, in that order
                (`slot_table`: any assignment, e.g. a planner's for packed documents).

T must be a multiple of the slot count for `shard` (contiguous: W; zigzag: 2W; a table: W·S).
Methods that work per slot take the local shard of any length for contiguous, and a multiple
of S for the others. Every method accepts `layout=` as a name or a `Layout` (a slot table).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from .comm import all_gather_dim0, group_rank_size

LAYOUTS = ("contiguous", "zigzag")
TABLE = "table"


@dataclass(frozen=True)
class Layout:
    """How W ranks hold a sequence's slots: a named layout, or (name "table") `table`, one row
    of slots per rank, each rank the same number."""

    name: str
    world: int
    table: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.name == TABLE:
            _check_table(self.table, self.world)
        elif self.name not in LAYOUTS:
            raise ValueError(f"unknown layout {self.name!r}; the layouts are {', '.join(LAYOUTS)} or a slot table "
                             f"(lasp2.parallel.slot_table)")
        elif self.table is not None:
            raise ValueError(f"the {self.name} layout takes no slot table")

    @property
    def slots_per_rank(self) -> int:
        return len(self.table[0]) if self.name == TABLE else 1 if self.name == "contiguous" else 2

    @property
    def n_slots(self) -> int:
        return self.world * self.slots_per_rank

    def slots(self, rank: int) -> tuple[int, ...]:
        """The global slots rank holds, in the order they appear in its shard."""
        if self.name == TABLE:
            return self.table[rank]
        return (rank,) if self.name == "contiguous" else (rank, 2 * self.world - 1 - rank)

    def __str__(self) -> str:
        return self.name if self.name != TABLE else f"slot table {[list(row) for row in self.table]}"

    def slot_owner(self) -> list[tuple[int, int]]:
        """For each global slot, (rank, index of the slot within that rank's shard)."""
        owner = [(0, 0)] * self.n_slots
        for rank in range(self.world):
            for index, slot in enumerate(self.slots(rank)):
                owner[slot] = (rank, index)
        return owner

    def slot_ranks(self) -> list[int]:
        """For each global slot, in sequence order, the rank holding it."""
        return [rank for rank, _ in self.slot_owner()]

    def check_global_length(self, seq_len: int, fn: str) -> int:
        """-> slot length; raises unless seq_len divides into n_slots equal slots."""
        if seq_len % self.n_slots:
            raise ValueError(
                f"{fn}: sequence length {seq_len} does not divide into the {self.n_slots} equal slots of "
                f"the {self} layout over {self.world} ranks; use a length divisible by {self.n_slots}"
            )
        return seq_len // self.n_slots

    def check_local_length(self, local_len: int, fn: str) -> int:
        """-> slot length; raises unless the local shard splits into this layout's slots."""
        if local_len % self.slots_per_rank:
            raise ValueError(
                f"{fn}: the {self} layout gives each rank {self.slots_per_rank} equal slots, but the local "
                f"shard has {local_len} tokens; use a global length divisible by {self.n_slots}"
            )
        return local_len // self.slots_per_rank

    def local_positions(self, rank: int, slot_len: int, device=None) -> torch.Tensor:
        """[slots_per_rank * slot_len] global positions of rank's tokens, in shard order."""
        return torch.cat([torch.arange(s * slot_len, (s + 1) * slot_len, device=device) for s in self.slots(rank)])


def _check_table(table, world: int) -> None:
    """Raises ValueError naming what is wrong: rows for every rank, equal in length, together
    every slot 0 .. W·S − 1 exactly once."""
    if not isinstance(table, tuple) or not all(isinstance(row, tuple) for row in table):
        raise TypeError("a slot table is a tuple of tuples of slot numbers, one per rank (use slot_table(rows))")
    if len(table) != world:
        raise ValueError(f"the slot table has {len(table)} rows; it needs one per rank, {world}")
    lengths = {len(row) for row in table}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every rank must hold the same number (>= 1) of slots; the slot table's rows hold "
                         f"{[len(row) for row in table]}")
    n = world * lengths.pop()
    counts = Counter(s for row in table for s in row)
    missing = sorted(set(range(n)) - set(counts))
    repeated = sorted(s for s, c in counts.items() if c > 1)
    outside = sorted(s for s in counts if not (isinstance(s, int) and 0 <= s < n))
    if missing or repeated or outside:
        problems = [f"{what} {values}" for what, values in (("misses", missing), ("repeats", repeated),
                                                             ("names slots outside 0..{}:".format(n - 1), outside))
                    if values]
        raise ValueError(f"the slot table {[list(r) for r in table]} " + "; ".join(problems)
                         + f"; every slot 0..{n - 1} must appear exactly once")


def slot_table(rows) -> Layout:
    """A layout from a slot table: rows[r] lists the slots rank r holds, in shard order (every
    rank the same number; together every slot 0 .. W·S − 1 exactly once). E.g. zigzag on two
    ranks is slot_table([[0, 3], [1, 2]])."""
    table = tuple(tuple(int(s) for s in row) for row in rows)
    return Layout(TABLE, len(table), table)


def as_layout(layout, world: int, fn: str = "layout") -> Layout:
    """A layout name or a Layout, checked against the group's size."""
    if isinstance(layout, Layout):
        if layout.world != world:
            raise ValueError(f"{fn}: the layout ({layout}) is for {layout.world} ranks, the group has {world}")
        return layout
    if not isinstance(layout, str):
        raise TypeError(f"{fn}: layout must be a layout name ({', '.join(LAYOUTS)}) or a Layout (slot_table), "
                        f"got {type(layout).__name__}")
    return Layout(layout, world)


def layout_for(group, layout) -> Layout:
    return as_layout(layout, group_rank_size(group)[1])


def shard(x: torch.Tensor, group, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (every rank passes the same x)."""
    lay = layout_for(group, layout)
    rank = group_rank_size(group)[0]
    slot_len = lay.check_global_length(x.shape[dim], "shard")
    pieces = [x.narrow(dim, s * slot_len, slot_len) for s in lay.slots(rank)]
    return torch.cat(pieces, dim=dim)


def unshard(x_local: torch.Tensor, group, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's equal-length shard (one all-gather; not differentiable)."""
    lay = layout_for(group, layout)
    if lay.world == 1:
        return x_local.clone()
    slot_len = lay.check_local_length(x_local.shape[dim], "unshard")
    moved = x_local.movedim(dim, 0).contiguous()
    gathered = all_gather_dim0(moved, group)
    per_rank = gathered.view(lay.world, lay.slots_per_rank, slot_len, *moved.shape[1:])
    ordered = torch.cat([per_rank[r, i] for r, i in lay.slot_owner()], dim=0)
    return ordered.movedim(0, dim)


def positions(seq_len: int, group, layout: str = "contiguous", device=None) -> torch.Tensor:
    """[seq_len / W] global token positions of this rank's shard (e.g. for RoPE)."""
    lay = layout_for(group, layout)
    slot_len = lay.check_global_length(seq_len, "positions")
    return lay.local_positions(group_rank_size(group)[0], slot_len, device)


def to_segments(x: torch.Tensor, segments: int) -> torch.Tensor:
    """[B, C, ...] -> [segments * B, C / segments, ...]: a rank's slots stacked into the batch."""
    if segments == 1:
        return x
    b, c = x.shape[:2]
    return x.reshape(b, segments, c // segments, *x.shape[2:]).transpose(0, 1).reshape(segments * b, c // segments, *x.shape[2:])


def from_segments(x: torch.Tensor, segments: int) -> torch.Tensor:
    """Inverse of `to_segments`."""
    if segments == 1:
        return x
    sb, c = x.shape[:2]
    b = sb // segments
    return x.reshape(segments, b, c, *x.shape[2:]).transpose(0, 1).reshape(b, segments * c, *x.shape[2:])


def slots_in_order(per_rank: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[W, S, ...] (rank, slot within the rank) -> [n_slots, ...] in sequence order."""
    return torch.stack([per_rank[r, i] for r, i in lay.slot_owner()])


def to_global_order(per_rank: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[W, B, C, ...] every rank's shard -> [B, T, ...] the sequence in order (differentiable)."""
    w, b, c = per_rank.shape[:3]
    slots = per_rank.reshape(w, b, lay.slots_per_rank, c // lay.slots_per_rank, *per_rank.shape[3:])
    return torch.cat([slots[r, :, i] for r, i in lay.slot_owner()], dim=1)


def to_rank_order(full: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[B, T, ...] the sequence -> [W, B, C, ...] every rank's shard (differentiable)."""
    slot_len = full.shape[1] // lay.n_slots
    pieces = [torch.cat([full[:, s * slot_len:(s + 1) * slot_len] for s in lay.slots(r)], dim=1) for r in range(lay.world)]
    return torch.stack(pieces)


def segments(q, k, v, log_decay, S: int):
    """q, k, v and a log decay with a rank's S slots stacked into the batch ([H] decays stay)."""
    g = log_decay if log_decay is None or log_decay.dim() == 1 else to_segments(log_decay, S)
    return to_segments(q, S), to_segments(k, S), to_segments(v, S), g


def unsegment_grads(grads: tuple, S: int) -> tuple:
    """Inverse of `segments` for (dq, dk, dv, d_log_decay)."""
    dq, dk, dv, dg = grads
    dg = dg if dg is None or dg.dim() == 1 else from_segments(dg, S)
    return from_segments(dq, S), from_segments(dk, S), from_segments(dv, S), dg
