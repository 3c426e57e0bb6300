"""What a sequence-parallel method is, declared once in the method's own file: `MethodSpec`.

A spec states the method's rules (the decay forms it expresses, whether shards must be equal,
its rule on heads, whether its compute is quadratic in the sequence length) and its
communication per pass as formulas of the problem's shapes. Everything else reads it: the
validator (rules, before any collective), the registry and `SequenceParallel`, the trainer's
configuration check, the benchmarks' cost model, the collective-count tests and the README's
method table (a test compares the two).

Formulas are written as they are printed, with `·` for products and `−` for minus, over the
symbols of `Problem.symbols` (B, C, N, W, S, H, K, V, Kg, Gt, Hq, Hkv, Hkv', Hk, D, Dv; for the
delta rule H counts the value heads and Hk = Hkv the key heads).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..ops.checks import DECAY_CHANNEL, DECAY_KINDS, DECAY_NONE, DECAY_TOKEN
from .layout import Layout

LINEAR, SOFTMAX, DELTA = "linear", "softmax", "delta"
PLURAL = {"all_gather": "all-gathers", "reduce_scatter": "reduce-scatters", "all_to_all": "all-to-alls",
          "send": "sends", "broadcast": "broadcasts"}
SINGULAR = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "all_to_all": "all-to-all", "send": "send",
            "broadcast": "broadcast"}


def ceil_log2(n: int) -> int:
    """⌈log2 n⌉ for n >= 1: the rounds of a recursive doubling over n slots."""
    return max(0, (int(n) - 1).bit_length())


def column_blocks(width: int, most: int) -> int:
    """The largest number of equal column blocks, at most `most`, that `width` columns divide into."""
    return max(b for b in range(1, min(most, width) + 1) if width % b == 0)


def evaluate(formula: str, symbols: dict) -> int:
    """The value of a formula such as 'S·B·H·(K·V + Kg)' or '⌈log2(S·W)⌉' for the given symbols."""
    expr = formula.replace("·", "*").replace("−", "-").replace("'", "_p")
    expr = expr.replace("⌈log2(", "_ceil_log((").replace("⌉", ")")
    expr = re.sub(r"(?<=[0-9])(?=[A-Za-z(])", "*", expr)  # 2K -> 2*K
    return int(eval(expr, {"__builtins__": {}, "_ceil_log": ceil_log2}, symbols))  # noqa: S307 - the specs' own text


@dataclass(frozen=True)
class Comm:
    """Calls of one kind of collective in one pass, as seen by one rank.

    values: formula of the values this rank hands to each call (reduce-scatter: its whole input).
    count: formula of the calls per rank; for a `chain` (dependent hops from rank to rank, "up"
        the sequence or "down" it, through its slots or `over` the ranks alone), the hops of
        the whole group, which the layout spreads over the ranks ("chain" route: slot to next
        slot; "doubling": recursive doubling, each slot to the slot 1, 2, 4, ... after it in
        ⌈log2(slots)⌉ rounds; for a doubling `count` gives the rounds).
    pieces: formula of the messages each hop is cut into (a pipelined chain's column blocks).
    precision: what one value weighs: "state" (fp32, fp64 for fp64 inputs), "input" (the input
        dtype), "promoted" (the input dtype promoted with the log decay's, when there is one) or
        "fp64".
    when: decay forms this call is made for (None: always).
    """

    kind: str
    values: str
    count: str = "1"
    precision: str = "state"
    chain: str | None = None
    over: str = "slots"
    when: tuple[str, ...] | None = None
    route: str = "chain"
    pieces: str = "1"

    def calls_of(self, problem: "Problem", rank: int, symbols: dict) -> int:
        """How many of these calls `rank` makes."""
        if self.chain is None:
            return evaluate(self.count, symbols)
        hops = chain_sends if self.route == "chain" else doubling_sends
        by_slots = self.over == "slots"
        sends = hops(problem.W, problem.S if by_slots else 1, problem.layout if by_slots else None)[rank]
        return sends[0 if self.chain == "up" else 1] * evaluate(self.pieces, symbols)

    def applies(self, decay: str) -> bool:
        return self.when is None or decay in self.when

    def describe(self) -> str:
        count = "" if self.count == "1" else f"{self.count} "
        name = SINGULAR[self.kind] if self.count == "1" else PLURAL[self.kind]
        text = f"{count}{name} of {self.values}"
        if self.route == "doubling":
            text = f"{self.count} rounds of {PLURAL[self.kind]} of {self.values}"
        elif self.pieces != "1":
            text = f"{self.count} hops of {self.pieces} {PLURAL[self.kind]} of {self.values}"
        if self.precision == "fp64":
            text += " (fp64)"
        if self.when is not None:
            text += " (" + ", ".join(f"`{d}`" for d in self.when) + " decay)"
        return text


# `MethodSpec.final_state` of the exchanges that leave each slot's state on its rank: the rank of
# the last slot broadcasts the state after it.
LAST_SLOT_BROADCAST = (Comm("broadcast", "B·H·K·V"),)


@dataclass(frozen=True)
class Plan:
    """A method's communication per pass: forward and backward calls, the dependent steps on
    the critical path, and what the communication overlaps."""

    forward: tuple[Comm, ...]
    backward: tuple[Comm, ...]
    steps: str  # formula: dependent communication steps per forward+backward
    overlap: str = ""  # what runs while it travels ("" nothing)


@dataclass(frozen=True)
class Problem:
    """One attention layer: B sequences of N tokens over W ranks, S slots per rank. Linear: H
    heads, head dims K, V, a decay form. Softmax: Hq query and Hkv key/value heads, dims D, Dv.
    dtype_bytes: bytes of one input value; state_bytes: of one state value; decay_bytes: of one
    log-decay value (None: as the inputs). layout: a slot table (`layout.slot_table`) when the
    slots are neither contiguous (S = 1) nor zigzag (S = 2); S is then its slots per rank."""

    B: int
    N: int
    W: int
    S: int = 1
    H: int = 1
    K: int = 1
    V: int = 1
    decay: str = DECAY_NONE
    Hkv: int | None = None
    dtype_bytes: int = 4
    state_bytes: int = 4
    decay_bytes: int | None = None
    layout: Layout | None = None

    def __post_init__(self):
        if self.layout is not None and (self.layout.world, self.layout.slots_per_rank) != (self.W, self.S):
            raise ValueError(f"Problem: the layout is for W={self.layout.world}, S={self.layout.slots_per_rank}; "
                             f"the problem says W={self.W}, S={self.S}")

    @property
    def C(self) -> int:
        return self.N // self.W

    def symbols(self) -> dict:
        hkv = self.Hkv or self.H
        return dict(B=self.B, C=self.C, N=self.N, W=self.W, S=self.S, H=self.H, K=self.K, V=self.V,
                    Kg={DECAY_NONE: 0, DECAY_CHANNEL: self.K}.get(self.decay, 1),
                    Gt={DECAY_TOKEN: 1, DECAY_CHANNEL: self.K}.get(self.decay, 0),
                    Hq=self.H, Hkv=hkv, Hk=hkv, Hkv_p=hkv if hkv % self.W == 0 else self.W, D=self.K, Dv=self.V)

    def value_bytes(self, precision: str) -> int:
        promoted = self.dtype_bytes if self.decay == DECAY_NONE else max(self.dtype_bytes, self.decay_bytes or 0)
        return {"state": self.state_bytes, "input": self.dtype_bytes, "promoted": promoted, "fp64": 8}[precision]


def _owners(W: int, S: int, layout: Layout | None) -> list[int]:
    """The rank holding each slot in sequence order: `layout`'s, else contiguous (S = 1) or zigzag."""
    return (layout or Layout("contiguous" if S == 1 else "zigzag", W)).slot_ranks()


def doubling_sends(W: int, S: int, layout: Layout | None = None) -> list[tuple[int, int]]:
    """(forward, backward) sends of each rank in a recursive doubling over the sequence's slots
    (forward: slot s to s + d, backward: s to s − d, d = 1, 2, 4, ... < W·S; none between two
    slots of one rank)."""
    owner = _owners(W, S, layout)
    sends = [[0, 0] for _ in range(W)]
    d = 1
    while d < len(owner):
        for s in range(len(owner) - d):
            if owner[s] != owner[s + d]:
                sends[owner[s]][0] += 1
                sends[owner[s + d]][1] += 1
        d *= 2
    return [tuple(x) for x in sends]


def chain_sends(W: int, S: int, layout: Layout | None = None) -> list[tuple[int, int]]:
    """(forward, backward) sends of each rank in a chain through the sequence's slots (zigzag:
    rank r holds slots r and 2W−1−r; a hop between two slots of one rank sends nothing)."""
    owner = _owners(W, S, layout)
    sends = [[0, 0] for _ in range(W)]
    for a, b in zip(owner, owner[1:]):
        if a != b:
            sends[a][0] += 1
            sends[b][1] += 1
    return [tuple(s) for s in sends]


@dataclass(frozen=True)
class MethodSpec:
    """A sequence-parallel method: its rules and its communication.

    fn: the public function (linear: fn(q, k, v, log_decay, *, scale, causal, group,
        chunk_size, validate, layout); softmax: fn(q, k, v, *, causal, scale, group, layout,
        validate); delta: fn(q, k, v, beta, log_decay, *, scale, group, layout, chunk_size,
        validate), H meaning the value heads).
    heads_rule(num_heads, num_kv_heads, world) -> None, or the problem in words.
    bidirectional: the plan for causal=False when it differs from `plan`.
    compute: the single-device kernel its local work runs: "chunk" (the chunked linear op),
        "left_product" (masked (Q K^T) V), "softmax_block" (softmax blocks merged by log-sum-exp),
        "sdpa_bottom_right" (SDPA of a query block against the keys up to its end) or
        "sdpa_causal" (causal SDPA over whole sequences); the cost model times it by that rate.
    blocks: the most column blocks a pipelined chain cuts each hop into (symbol P).
    final_state: the calls a causal forward adds to return the state after the whole sequence
        (`output_final_state=True`, the prefill of generation): () none, None: the method cannot.
    """

    name: str
    family: str
    fn: Callable
    plan: Plan
    notes: str = ""
    decays: tuple[str, ...] = DECAY_KINDS
    equal_shards: bool = True
    quadratic: bool = False
    heads_rule: Callable[[int, int, int], str | None] | None = None
    bidirectional: Plan | None = None
    decay_reason: str = ""  # why the missing decay forms cannot be expressed
    compute: str = "chunk"
    blocks: int = 1
    final_state: tuple[Comm, ...] | None = None

    def symbols(self, problem: Problem) -> dict:
        """The problem's symbols and P: the column blocks each hop of a pipelined chain is cut
        into (the largest divisor of V not above `blocks`)."""
        return {**problem.symbols(), "P": column_blocks(problem.V, self.blocks)}

    def plan_for(self, causal: bool) -> Plan:
        return self.plan if causal or self.bidirectional is None else self.bidirectional

    def check_rules(self, fn_name: str, decay: str, num_heads: int, num_kv_heads: int, world: int) -> None:
        """Raises ValueError naming the rule a call breaks (before any collective). The decay
        rule holds at every W, so that a setup does not start failing when it scales out."""
        if decay not in self.decays:
            allowed = ", ".join(d for d in DECAY_KINDS if d in self.decays)
            raise ValueError(f"{fn_name}: log decay of the {decay!r} form is not supported by this method (supported: "
                             f"{allowed}){'; ' + self.decay_reason if self.decay_reason else ''}")
        if self.heads_rule is not None and world > 1:
            problem = self.heads_rule(num_heads, num_kv_heads, world)
            if problem:
                raise ValueError(f"{fn_name}: {problem}")

    def calls(self, problem: Problem, causal: bool = True, rank: int | None = None) -> tuple[list, list]:
        """(forward, backward) [(kind, bytes)] one rank hands to torch.distributed, in order of
        the plan (chain hops: that rank's own; rank None: the busiest rank)."""
        if problem.W == 1:
            return [], []
        symbols = self.symbols(problem)
        plan = self.plan_for(causal)
        ranks = range(problem.W) if rank is None else [rank]
        best = None
        for r in ranks:
            passes = []
            for comms in (plan.forward, plan.backward):
                out = []
                for c in comms:
                    if not c.applies(problem.decay):
                        continue
                    out += [(c.kind, evaluate(c.values, symbols) * problem.value_bytes(c.precision))] * c.calls_of(problem, r, symbols)
                passes.append(out)
            total = sum(b for p in passes for _, b in p)
            if best is None or total > best[0]:
                best = (total, passes)
        return tuple(best[1])

    def bytes_per_rank(self, problem: Problem, causal: bool = True) -> int:
        """Bytes the busiest rank hands to torch.distributed in one forward+backward."""
        forward, backward = self.calls(problem, causal)
        return sum(b for _, b in forward + backward)

    def sequential_steps(self, problem: Problem) -> int:
        return 0 if problem.W == 1 else evaluate(self.plan.steps, self.symbols(problem))

    def table_row(self) -> str:
        """This method's row of the README's method table (`registry.method_table`)."""
        def cell(comms):
            return " + ".join(c.describe() for c in comms) or "—"

        decays = "all" if self.decays == DECAY_KINDS else ", ".join(
            {"none": "none", "head": "`[H]`", "token": "`[B,T,H]`", "channel": "`[B,T,H,K]`"}[d] for d in self.decays)
        steps = self.plan.steps + (f", overlapped with {self.plan.overlap}" if self.plan.overlap else "")
        notes = [self.notes] if self.notes else []
        if self.quadratic:
            notes.insert(0, "quadratic in N")
        if not self.equal_shards:
            notes.append("shards may differ in length")
        if self.bidirectional is not None:
            notes.append(f"causal=False: {cell(self.bidirectional.forward)} forward, "
                         f"{cell(self.bidirectional.backward)} backward")
        return (f"| `{self.name}` ({self.family}) | {cell(self.plan.forward)} | {cell(self.plan.backward)} | {steps} | "
                f"{decays if self.family in (LINEAR, DELTA) else '—'} | {'; '.join(notes)} |")


TABLE_HEADER = ("| method | forward | backward | dependent steps per forward+backward | decays | notes |\n"
                "|---|---|---|---|---|---|")
