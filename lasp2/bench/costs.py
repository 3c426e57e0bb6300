"""What each sequence-parallel method sends and computes per attention layer, and an α–β model
of how long that takes.

The byte counts are the README's method table as code (no decay, causal), per rank and per
forward+backward; `tests/bench/test_costs.py` checks them against the counted collectives.
Times: a collective of n bytes costs its steps × (α + bytes per step / β), with the α and β of
the slowest link it crosses (intra-node or inter-node); compute costs FLOPs / rate.
"""
from __future__ import annotations

from dataclasses import dataclass

CHUNK = 64
QUADRATIC = {("linear", "ring"), ("linear", "allgather"), ("softmax", "allgather"), ("softmax", "ring"),
             ("softmax", "ulysses")}


@dataclass(frozen=True)
class Layer:
    """One attention layer's problem: B sequences of N tokens over W ranks, H query heads
    (kv_heads for softmax GQA), head dims K and V, `elem` bytes per communicated value (fp32
    states and blocks travel as 4 bytes), S slots per rank (1 contiguous, 2 zigzag)."""

    B: int
    N: int
    W: int
    H: int
    K: int
    V: int
    kv_heads: int | None = None
    elem: int = 4
    slots: int = 1

    @property
    def C(self) -> int:
        return self.N // self.W

    @property
    def Hkv(self) -> int:
        return self.kv_heads or self.H


@dataclass(frozen=True)
class Comm:
    """`calls` collectives of one kind per pass; `bytes` is what this rank hands to each call
    (reduce-scatter: the whole input); `chain` marks point-to-point hops that depend on each
    other across ranks (LASP-1), as opposed to concurrent ring steps."""

    kind: str  # all_gather | reduce_scatter | all_to_all | p2p
    bytes: int
    calls: int = 1
    chain: bool = False


def comm_plan(family: str, method: str, x: Layer) -> tuple[list[Comm], list[Comm]]:
    """(forward, backward) communication of the busiest rank, no decay."""
    W, C, e = x.W, x.C, x.elem
    if W == 1:
        return [], []
    if family == "linear":
        state = x.slots * x.B * x.H * x.K * x.V * e
        kv_block = x.B * C * x.H * (x.K + x.V) * e
        if method == "lasp2":
            return [Comm("all_gather", state)], [Comm("all_gather", state)]
        if method == "lasp1":
            fwd_sends, bwd_sends = lasp1_sends(W, x.slots)
            hop = x.B * x.H * x.K * x.V * e
            return [Comm("p2p", hop, fwd_sends, chain=True)], [Comm("p2p", hop, bwd_sends, chain=True)]
        if method == "ring":
            return [Comm("p2p", kv_block, W - 1)], [Comm("p2p", kv_block, 2 * W - 1)]
        if method == "allgather":
            return [Comm("all_gather", kv_block)], [Comm("reduce_scatter", W * kv_block)]
        if method == "ulysses":
            into, out = x.B * C * x.H * (2 * x.K + x.V) * e, x.B * C * x.H * x.V * e
            return [Comm("all_to_all", into), Comm("all_to_all", out)], [Comm("all_to_all", out), Comm("all_to_all", into)]
    if family == "softmax":
        kv_block = x.B * C * x.Hkv * (x.K + x.V) * e
        if method == "allgather":
            return [Comm("all_gather", kv_block)], [Comm("reduce_scatter", W * kv_block)]
        if method == "ring":
            return [Comm("p2p", kv_block, W - 1)], [Comm("p2p", kv_block, 2 * W - 1)]
        if method == "ulysses":
            kv_heads = x.Hkv if x.Hkv % W == 0 else W
            into, out = x.B * C * (x.H * x.K + kv_heads * (x.K + x.V)) * e, x.B * C * x.H * x.V * e
            return [Comm("all_to_all", into), Comm("all_to_all", out)], [Comm("all_to_all", out), Comm("all_to_all", into)]
    raise ValueError(f"no cost formula for {family} method {method!r}")


def lasp1_sends(W: int, slots: int) -> tuple[int, int]:
    """(forward, backward) sends of the busiest rank in LASP-1's chain over the W*slots slots
    (zigzag: rank r holds slots r and 2W-1-r); a hop between slots of one rank sends nothing."""
    order = list(range(W)) if slots == 1 else list(range(W)) + list(reversed(range(W)))  # owner of each slot
    fwd, bwd = [0] * W, [0] * W
    for s in range(len(order) - 1):
        if order[s] != order[s + 1]:
            fwd[order[s]] += 1
            bwd[order[s + 1]] += 1
    busiest = max(range(W), key=lambda r: fwd[r] + bwd[r])
    return fwd[busiest], bwd[busiest]


def bytes_per_rank(family: str, method: str, x: Layer) -> int:
    """Bytes the busiest rank hands to torch.distributed in one forward+backward."""
    fwd, bwd = comm_plan(family, method, x)
    return sum(c.bytes * c.calls for c in fwd + bwd)


def sequential_steps(family: str, method: str, x: Layer) -> int:
    """Dependent communication steps per forward+backward on the critical path."""
    if (family, method) == ("linear", "lasp1"):
        return 2 * (x.W - 1) * x.slots  # the chain's hops, forward and backward
    fwd, bwd = comm_plan(family, method, x)
    return sum(c.calls for c in fwd + bwd)


def flops(family: str, method: str, x: Layer) -> tuple[float, float]:
    """(matmul FLOPs on one rank that can overlap the method's communication, the rest), for
    forward+backward (backward counted as twice the forward).

    Chunked linear methods: intra-chunk B·H·C·2·64·(K+V) per pass-unit (overlappable in LASP-2
    and LASP-1) and the state terms B·H·C·4·K·V. Quadratic methods: scores and values of the
    local queries against all N keys, B·H·C·N·2·(K+V), recomputed blocks in backward (×3.5);
    halved for causal Ulysses softmax, whose kernel skips the masked half (the busiest rank of
    the contiguous layout sees every key in the others)."""
    BHC = x.B * x.H * x.C
    if (family, method) not in QUADRATIC:
        return 3.0 * BHC * 2 * CHUNK * (x.K + x.V), 3.0 * BHC * 4 * x.K * x.V
    causal_share = 0.5 if (family, method) == ("softmax", "ulysses") else 1.0
    return 0.0, causal_share * 3.5 * BHC * x.N * 2 * (x.K + x.V)


KERNEL = {("linear", "ring"): "left_product", ("linear", "allgather"): "left_product", ("softmax", "ring"): "softmax_block",
          ("softmax", "allgather"): "sdpa_masked", ("softmax", "ulysses"): "sdpa_causal"}


def kernel(family: str, method: str) -> str:
    """Which measured kernel rate (lasp2.bench.calibrate) a method's compute runs at."""
    return KERNEL.get((family, method), "chunk")


@dataclass(frozen=True)
class Network:
    """α (s) and β (bytes/s, one direction per rank) within a node and between nodes; point-to-
    point messages within a node may have their own (p2p_alpha, p2p_beta), e.g. gloo's."""

    alpha_intra: float
    beta_intra: float
    alpha_inter: float
    beta_inter: float
    ranks_per_node: int
    p2p_alpha: float | None = None
    p2p_beta: float | None = None

    def hop(self, nbytes: int, inter: bool) -> float:
        if inter:
            return self.alpha_inter + nbytes / self.beta_inter
        return (self.p2p_alpha or self.alpha_intra) + nbytes / (self.p2p_beta or self.beta_intra)

    def link(self, W: int) -> tuple[float, float]:
        """(α, β) of the slowest link a W-rank ring or collective crosses."""
        return (self.alpha_intra, self.beta_intra) if W <= self.ranks_per_node else (self.alpha_inter, self.beta_inter)

    def collective(self, c: Comm, W: int) -> float:
        """Seconds for one call, ring algorithms (W−1 steps of 1/W of the data)."""
        alpha, beta = self.link(W)
        if c.kind == "all_gather":
            return (W - 1) * (alpha + c.bytes / beta)
        if c.kind == "reduce_scatter":
            return (W - 1) * (alpha + c.bytes / W / beta)
        if c.kind == "all_to_all":
            return alpha + c.bytes * (W - 1) / W / beta
        if c.kind == "p2p":
            return self.hop(c.bytes, W > self.ranks_per_node)
        raise ValueError(c.kind)

    def chain(self, c: Comm, hops: int) -> float:
        """A chain of dependent hops around W ranks: a hop crosses nodes every ranks_per_node."""
        inter = hops // self.ranks_per_node
        return (hops - inter) * self.hop(c.bytes, False) + inter * self.hop(c.bytes, True)


def layer_time(family: str, method: str, x: Layer, net: Network, rate: float) -> dict:
    """Predicted forward+backward seconds of one layer on the busiest rank: compute at `rate`
    FLOP/s; LASP-2 and LASP-1 overlap their communication with the intra-chunk compute; ring
    overlaps each hop with a block's compute; all-gather and Ulysses wait for theirs."""
    overlap_flops, rest_flops = flops(family, method, x)
    overlap_s, rest_s = overlap_flops / rate, rest_flops / rate
    fwd, bwd = comm_plan(family, method, x)
    if method == "lasp1" and family == "linear":
        comm = 2 * net.chain(fwd[0], (x.W - 1) * x.slots) if fwd else 0.0  # the last rank waits for every hop
    else:
        comm = sum(net.collective(c, x.W) * c.calls for c in fwd + bwd)
    if family == "linear" and method in ("lasp2", "lasp1"):
        total = max(overlap_s, comm) + rest_s
    elif method == "ring":
        total = max(rest_s, comm)
    else:
        total = overlap_s + rest_s + comm
    return {"seconds": total, "compute_s": overlap_s + rest_s, "comm_s": comm}
