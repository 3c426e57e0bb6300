"""How long a sequence-parallel method takes per attention layer: an α–β model of its
communication, read from the method's spec (`lasp2.parallel.MethodSpec`), and its compute;
`choose_exchange` picks the state passing a layer runs with `SequenceParallel(linear="auto")`.

Bytes and calls are the spec's (`MethodSpec.calls`, the README's method table; the
collective-count tests check them against what the methods issue). Times: a collective of n
bytes costs its steps × (α + bytes per step / β), with the α and β of the slowest link it
crosses (intra-node or inter-node); a chain of dependent hops costs one hop each, a pipelined
one (P pieces a hop) hops + P − 1 piece hops, a recursive doubling one hop per round (the
slowest link once W leaves a node); compute costs FLOPs / rate. A method whose plan overlaps
its communication hides it behind the overlappable compute: the intra-chunk work of a chunked
method, every block of a quadratic one. `lasp2_bench` calibrates α, β and the rates on a
machine (`project --calibrate`) and projects to clusters (`project`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .spec import DELTA, MethodSpec, Problem, evaluate

CHUNK = 64
# The measured kernel rate (`calibrate.measure_kernels`) each kind of local compute runs at.
KERNEL = {"chunk": "chunk", "left_product": "left_product", "softmax_block": "softmax_block",
          "sdpa_bottom_right": "sdpa_masked", "sdpa_causal": "sdpa_causal"}


def flops(spec: MethodSpec, x: Problem) -> tuple[float, float]:
    """(matmul FLOPs on the busiest rank that can overlap the method's communication, the rest),
    for forward+backward (backward counted as twice the forward).

    Chunked methods: intra-chunk B·H·C·2·64·(K+V) (overlappable when the plan overlaps) and the
    state terms B·H·C·4·K·V. Quadratic methods: scores and values of the local queries against
    all N keys, B·H·C·N·2·(K+V), recomputed blocks in backward (×3.5); halved for a causal
    whole-sequence kernel, which skips the masked half (the busiest rank of the contiguous
    layout sees every key in the others). The delta rule (`benchmarks/bench_ops.py`'s count):
    the query side B·H·C·2·64·(2K+V) (the q·k scores, Qe = Q̃ − P W, P Ū; what LASP-2 overlaps)
    and the rest B·H·C·(2·64·(2K+V) + 2·64²/3 + 6·K·V) (the k·k scores, the triangular inverse,
    W, Ū, the carried state and its readout)."""
    BHC = x.B * x.H * x.C
    if spec.family == DELTA:
        query_side = 3.0 * BHC * 2 * CHUNK * (2 * x.K + x.V)
        rest = 3.0 * BHC * (2 * CHUNK * (2 * x.K + x.V) + 2 * CHUNK**2 / 3 + 6 * x.K * x.V)
        return (query_side, rest) if spec.plan.overlap else (0.0, query_side + rest)
    if not spec.quadratic:
        intra, state = 3.0 * BHC * 2 * CHUNK * (x.K + x.V), 3.0 * BHC * 4 * x.K * x.V
        return (intra, state) if spec.plan.overlap else (0.0, intra + state)
    causal_share = 0.5 if spec.compute == "sdpa_causal" else 1.0
    total = causal_share * 3.5 * BHC * x.N * 2 * (x.K + x.V)
    return (total, 0.0) if spec.plan.overlap else (0.0, total)


def kernel(spec: MethodSpec) -> str:
    """Which measured kernel rate (`lasp2_bench.calibrate`) a method's compute runs at."""
    return KERNEL[spec.compute]


@dataclass(frozen=True)
class Network:
    """α (s) and β (bytes/s, one direction per rank) within a node and between nodes; point-to-
    point messages within a node may have their own (p2p_alpha, p2p_beta), e.g. gloo's;
    overhead (s) is paid once per collective call and once per chain or doubling pass (a
    launch and a synchronisation, as timed from the host)."""

    alpha_intra: float
    beta_intra: float
    alpha_inter: float
    beta_inter: float
    ranks_per_node: int
    p2p_alpha: float | None = None
    p2p_beta: float | None = None
    overhead: float = 0.0

    def hop(self, nbytes: int, inter: bool) -> float:
        if inter:
            return self.alpha_inter + nbytes / self.beta_inter
        return (self.p2p_alpha or self.alpha_intra) + nbytes / (self.p2p_beta or self.beta_intra)

    def link(self, W: int) -> tuple[float, float]:
        """(α, β) of the slowest link a W-rank ring or collective crosses."""
        return (self.alpha_intra, self.beta_intra) if W <= self.ranks_per_node else (self.alpha_inter, self.beta_inter)

    def collective(self, kind: str, nbytes: int, W: int) -> float:
        """Seconds for one call handing over nbytes, ring algorithms (W−1 steps of 1/W of the data)."""
        alpha, beta = self.link(W)
        if kind == "all_gather":
            return self.overhead + (W - 1) * (alpha + nbytes / beta)
        if kind == "reduce_scatter":
            return self.overhead + (W - 1) * (alpha + nbytes / W / beta)
        if kind == "all_to_all":
            return self.overhead + alpha + nbytes * (W - 1) / W / beta
        if kind == "send":
            return self.overhead + self.hop(nbytes, W > self.ranks_per_node)
        raise ValueError(f"no time model for a {kind!r} call")

    def chain(self, nbytes: int, hops: int) -> float:
        """A chain of dependent hops around W ranks: a hop crosses nodes every ranks_per_node."""
        inter = hops // self.ranks_per_node
        return self.overhead + (hops - inter) * self.hop(nbytes, False) + inter * self.hop(nbytes, True)

    def doubling(self, nbytes: int, rounds: int, W: int) -> float:
        """Recursive doubling: `rounds` dependent rounds, each a hop of nbytes from every rank
        (some cross nodes once the group does)."""
        return self.overhead + rounds * self.hop(nbytes, W > self.ranks_per_node)

    @classmethod
    def from_calibration(cls, calibration: dict, world: int) -> "Network":
        """One group's figures as `lasp2_bench attn` measures them (attn-calibration.json:
        allgather_alpha/beta, p2p_alpha/beta; one node), or plain {"alpha": s, "beta": bytes/s}."""
        if "alpha" in calibration:
            return cls(calibration["alpha"], calibration["beta"], calibration["alpha"], calibration["beta"], world)
        return cls(calibration["allgather_alpha"], calibration["allgather_beta"], calibration["allgather_alpha"],
                   calibration["allgather_beta"], world, p2p_alpha=calibration["p2p_alpha"],
                   p2p_beta=calibration["p2p_beta"])


def network_from_json(text: str, world: int) -> Network:
    """A Network from JSON: {"alpha": s, "beta": bytes/s} (one link everywhere), one group's
    calibration as `lasp2_bench attn` measures it, or its whole attn-calibration.json (a list:
    the entry of this group size, else of the largest one measured)."""
    data = json.loads(text)
    if isinstance(data, list):
        measured = [d for d in data if "allgather_alpha" in d]
        if not measured:
            raise ValueError("the calibration holds no network figures (it measured one rank only)")
        data = next((d for d in measured if d.get("world") == world), max(measured, key=lambda d: d["world"]))
    return Network.from_calibration(data, world)


def rates_from_json(text: str) -> dict:
    """The kernel rates (FLOP/s) a calibration measured on one rank (`rate_chunk`,
    `rate_sdpa_masked`, ...: the entry of `lasp2_bench attn`'s attn-calibration.json that has
    them), or {} when it holds none (a plain {"alpha", "beta"})."""
    data = json.loads(text)
    entries = data if isinstance(data, list) else [data]
    measured = [d for d in entries if "rate_chunk" in d]
    return {k: v for k, v in measured[0].items() if k.startswith("rate_")} if measured else {}


# Networks `SequenceParallel(linear="auto")` assumes when given none (state the figures you know
# with `network=`; `lasp2_bench attn` measures a group's): NVLink within 8-GPU nodes and
# InfiniBand between them (80% of 300 GB/s and of 25 GB/s per GPU, α 10 and 20 µs, as
# `lasp2_bench project` assumes for the paper's A100 cluster), and gloo between processes of
# one host (measured on this project's 2-core machine, benchmarks/results/2026-11-22-cpu2/
# attn-calibration.json: all-gather α 445 µs, β 0.41 GB/s; a point-to-point hop 233 µs, 1.5 GB/s).
NVLINK_IB = Network(alpha_intra=10e-6, beta_intra=0.8 * 300e9, alpha_inter=20e-6, beta_inter=0.8 * 25e9, ranks_per_node=8)
LOOPBACK = Network(alpha_intra=445e-6, beta_intra=0.41e9, alpha_inter=445e-6, beta_inter=0.41e9, ranks_per_node=1 << 30,
                   p2p_alpha=233e-6, p2p_beta=1.55e9)


def _comm_parts(spec: MethodSpec, x: Problem, net: Network) -> tuple[float, float]:
    """(seconds of collectives, seconds of chains) of the causal plan per forward+backward on
    the busiest rank; a chain costs its hops one after another (the last rank waits for each)."""
    if x.W == 1:
        return 0.0, 0.0
    symbols, plan, collectives, chains = spec.symbols(x), spec.plan, 0.0, 0.0
    for c in plan.forward + plan.backward:
        if not c.applies(x.decay):
            continue
        nbytes = evaluate(c.values, symbols) * x.value_bytes(c.precision)
        if c.chain is None:
            collectives += evaluate(c.count, symbols) * net.collective(c.kind, nbytes, x.W)
        elif c.route == "doubling":  # a rank sends up to S windows a round
            chains += net.doubling(x.S * nbytes, evaluate(c.count, symbols), x.W)
        else:  # P pieces a hop, pipelined: the last piece leaves P − 1 piece hops after the first
            chains += net.chain(nbytes, evaluate(c.count, symbols) + evaluate(c.pieces, symbols) - 1)
    return collectives, chains


def comm_seconds(spec: MethodSpec, x: Problem, net: Network) -> float:
    """Seconds of the causal plan's communication per forward+backward on the busiest rank."""
    return sum(_comm_parts(spec, x, net))


def layer_time(spec: MethodSpec, x: Problem, net: Network, rate: float) -> dict:
    """Predicted forward+backward seconds of one layer on the busiest rank: compute at `rate`
    FLOP/s; collectives the plan overlaps hide behind the overlappable compute, the rest waits.
    A chain (LASP-1) waits too: each rank forwards after its own intra-chunk compute, so all
    hops but the first follow it (the first is not credited)."""
    overlap_flops, rest_flops = flops(spec, x)
    overlap_s, rest_s = overlap_flops / rate, rest_flops / rate
    collectives, chains = _comm_parts(spec, x, net)
    return {"seconds": max(overlap_s, collectives) + chains + rest_s, "compute_s": overlap_s + rest_s,
            "comm_s": collectives + chains}


# The exchanges `choose_exchange` weighs: the state-passing methods, exact for every decay form
# and the delta rule, whose traffic is a state per slot (not the sequence's keys and values).
STATE_PASSING = ("lasp2", "lasp1", "allscan", "logscan")


def choose_exchange(methods: dict, x: Problem, net: Network, rate: float | None = None) -> tuple[str, dict]:
    """-> (the name of the state-passing method predicted fastest for this layer, predicted
    seconds per forward+backward of each candidate). methods: a family's registry (name ->
    MethodSpec). rate: the chunk kernel's FLOP/s on one rank; given, layers compare whole
    (LASP-2's all-gather hides behind its intra-chunk compute, the chains' and rounds' waits
    add); None, the communication alone. Within 0.1% of the fastest, the earlier of
    STATE_PASSING wins (a prediction is not that precise)."""
    seconds = {}
    for name in STATE_PASSING:
        if name in methods and x.decay in methods[name].decays:
            spec = methods[name]
            seconds[name] = comm_seconds(spec, x, net) if rate is None else layer_time(spec, x, net, rate)["seconds"]
    fastest = min(seconds.values())
    return next(name for name, t in seconds.items() if t <= fastest * 1.001), seconds
