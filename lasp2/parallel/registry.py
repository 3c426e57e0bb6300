"""One interface for every sequence-parallel method; the only place that maps names to methods.

    sp = SequenceParallel(group, linear="lasp2", softmax="allgather", layout="zigzag")  # LASP-2H
    o = sp.linear_attn(q, k, v, log_decay)        # linear-attention layers
    o = sp.softmax_attn(q, k, v)                  # softmax-attention layers
    o = sp.delta_rule(q, k, v, beta, log_decay)   # delta-rule layers (DeltaNet, Gated DeltaNet, KDA)
    x_local = sp.shard(x); pos = sp.positions(seq_len)

group=None means one device: every call runs the single-device op.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist

from . import allgather, allscan, delta, lasp1, lasp2, logscan, ring, ulysses
from ..ops.checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_NONE, DECAY_TOKEN, compute_dtype
from ..ops.documents import documents
from .cost import LOOPBACK, NVLINK_IB, Network, choose_exchange
from .comm import group_rank_size
from .conv import causal_conv1d
from .layout import LAYOUTS, TABLE, Layout, as_layout, positions, shard, unshard
from .spec import DELTA, LINEAR, SOFTMAX, TABLE_HEADER, MethodSpec, Problem

AUTO = "auto"  # SequenceParallel(linear=AUTO, delta=AUTO): the cost model picks per layer shape
_LOG = logging.getLogger(__name__)

# name -> MethodSpec, by family; the spec's `fn` is the method's function.
LINEAR_METHODS: dict[str, MethodSpec] = {}
SOFTMAX_METHODS: dict[str, MethodSpec] = {}
DELTA_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Makes a method available by name to `SequenceParallel`, the trainer and the benchmarks
    (a method in its own file only needs this call)."""
    methods = {LINEAR: LINEAR_METHODS, SOFTMAX: SOFTMAX_METHODS, DELTA: DELTA_METHODS}[spec.family]
    methods[spec.name] = spec
    return spec


for _spec in (lasp2.SPEC, lasp1.SPEC, allscan.SPEC, logscan.SPEC, ring.SPEC, allgather.SPEC, ulysses.SPEC,
              allgather.SOFTMAX_SPEC, ring.SOFTMAX_SPEC, ulysses.SOFTMAX_SPEC,
              delta.LASP2_SPEC, delta.LASP1_SPEC, allscan.DELTA_SPEC, logscan.DELTA_SPEC, ulysses.DELTA_SPEC):
    register(_spec)


def method_spec(family: str, name: str) -> MethodSpec:
    """The spec of a registered method; ValueError listing the valid names otherwise."""
    methods = {LINEAR: LINEAR_METHODS, SOFTMAX: SOFTMAX_METHODS, DELTA: DELTA_METHODS}[family]
    if name not in methods:
        raise ValueError(f"unknown {family} method {name!r} (valid: {', '.join(methods)})")
    return methods[name]


def method_table() -> str:
    """The README's method table, one row per registered method, from the specs."""
    specs = [*LINEAR_METHODS.values(), *SOFTMAX_METHODS.values(), *DELTA_METHODS.values()]
    return "\n".join([TABLE_HEADER] + [spec.table_row() for spec in specs])


def final_state_methods(family: str) -> list[str]:
    """The linear or delta-rule methods that return the state after the sequence
    (`MethodSpec.final_state`), in registration order."""
    methods = LINEAR_METHODS if family == LINEAR else DELTA_METHODS
    return [name for name, spec in methods.items() if spec.final_state is not None]


def _final_state(family: str, name: str, output_final_state: bool) -> dict:
    """output_final_state as a keyword only when asked for (a registered method need not take
    it); ValueError, before any collective, when the method cannot return the final state."""
    if not output_final_state:
        return {}
    able = final_state_methods(family)
    if name not in able:
        able = ", ".join(able)
        raise ValueError(f"SequenceParallel: the {family} method {name!r} cannot return the final state "
                         f"(output_final_state=True, the prefill of generation); methods that can: {able}")
    return {"output_final_state": True}


def _documents(cu_seqlens, bound) -> dict:
    """cu_seqlens (or the context's) as a keyword only when there is one: a registered method
    need not take it."""
    cu_seqlens = bound if cu_seqlens is None else cu_seqlens
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}


class SequenceParallel:
    """The sequence-parallel context a model's attention layers call.

    Args:
        group: the sequence-parallel process group, or None for a single device.
        linear: method for linear-attention layers, one of LINEAR_METHODS.
        softmax: method for softmax-attention layers, one of SOFTMAX_METHODS.
        layout: "contiguous", "zigzag" or a slot table (`slot_table(rows)`); one layout for every
            layer of a model.
        validate: every call first checks that the ranks agree on shapes (one small all-gather).
        chunk_size: tokens per chunk of the linear-attention and delta-rule kernels.
        delta: method for delta-rule layers, one of DELTA_METHODS.
        linear and delta may be "auto": for each layer shape (B, C, H, K, V, decay form, dtype)
            the cost model (`cost.choose_exchange`) picks the state passing (LASP-2, LASP-1,
            allscan, logscan) predicted fastest on `network`; every rank picks the same, and the
            pick is logged once per shape (and kept in `decisions`).
        network: the α–β figures of the group's links (`cost.Network`, e.g. from
            `Network.from_calibration` of what `lasp2_bench attn` measures); None assumes
            `cost.NVLINK_IB` on NCCL and `cost.LOOPBACK` (gloo on one host) otherwise.
        rate: the chunk kernel's FLOP/s on one rank; given, "auto" weighs LASP-2's overlap with
            the intra-chunk compute; None compares the communication alone.
    """

    def __init__(self, group=None, linear: str = "lasp2", softmax: str = "allgather", layout: str = "contiguous",
                 *, validate: bool = False, chunk_size: int = 64, delta: str = "lasp2", network: Network | None = None,
                 rate: float | None = None):
        problems = []
        if delta not in DELTA_METHODS and delta != AUTO:
            problems.append(f"delta={delta!r} (valid: {', '.join(DELTA_METHODS)}, {AUTO})")
        if linear not in LINEAR_METHODS and linear != AUTO:
            problems.append(f"linear={linear!r} (valid: {', '.join(LINEAR_METHODS)}, {AUTO})")
        if softmax not in SOFTMAX_METHODS:
            problems.append(f"softmax={softmax!r} (valid: {', '.join(SOFTMAX_METHODS)})")
        world = group_rank_size(group)[1]
        if isinstance(layout, Layout) and layout.world != world:
            problems.append(f"layout {layout} is for {layout.world} ranks, the group has {world}")
        elif not isinstance(layout, Layout) and layout not in LAYOUTS:
            problems.append(f"layout={layout!r} (valid: {', '.join(LAYOUTS)}, or a slot table: slot_table(rows))")
        if problems:
            raise ValueError("SequenceParallel: unknown " + "; ".join(problems))
        self.group, self.linear, self.softmax, self.delta, self.layout = group, linear, softmax, delta, layout
        self.validate, self.chunk_size = validate, chunk_size
        self.rank, self.world = group_rank_size(group)
        self.cu_seqlens = None  # packed documents of the current batch (`with_documents`)
        self.network, self.rate = network, rate
        self.decisions: dict = {}  # "auto": layer shape -> (method, why), shared by this context's copies

    def _choose(self, family: str, name: str, q, v, log_decay, value_heads: int, key_heads: int, packed: bool) -> str:
        """The method a call runs: `name`, or for "auto" the cost model's pick for this shape."""
        if name != AUTO:
            return name
        methods = LINEAR_METHODS if family == LINEAR else DELTA_METHODS
        if self.world == 1:
            return "lasp2"  # one device: every method runs the single-device op
        decay = (DECAY_NONE if log_decay is None else DECAY_HEAD if log_decay.dim() == 1
                 else DECAY_CHANNEL if log_decay.dim() == 4 else DECAY_TOKEN)
        if packed and decay in (DECAY_NONE, DECAY_HEAD):  # document resets travel as per-token decays
            decay = DECAY_TOKEN
        B, C, K, V = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
        key = (family, B, C, value_heads, key_heads, K, V, decay, q.dtype)
        if key not in self.decisions:
            network = self.network or (NVLINK_IB if dist.get_backend(self.group) == "nccl" else LOOPBACK)
            state_bytes = torch.empty((), dtype=compute_dtype(q.dtype)).element_size()
            lay = as_layout(self.layout, self.world)
            problem = Problem(B=B, N=C * self.world, W=self.world, S=lay.slots_per_rank, H=value_heads, K=K, V=V,
                              decay=decay, Hkv=key_heads, dtype_bytes=q.element_size(), state_bytes=state_bytes,
                              layout=lay if lay.name == TABLE else None)
            best, seconds = choose_exchange(methods, problem, network, self.rate)
            why = (f"{family} layers with B={B}, C={C}, H={value_heads}, K={K}, V={V}, decay {decay} at W={self.world}: "
                   f"{best} (predicted ms per forward+backward, {'whole layer' if self.rate else 'communication'}: "
                   + ", ".join(f"{n} {t * 1e3:.3f}" for n, t in seconds.items()) + ")")
            self.decisions[key] = (best, why)
            _LOG.info("SequenceParallel(%s=auto) picks %s", family if family == LINEAR else "delta", why)
        return self.decisions[key][0]

    def with_documents(self, cu_seqlens) -> "SequenceParallel":
        """This context for one packed row: every call below passes its documents (the global
        offsets `cu_seqlens`, B = 1, checked here once as `lasp2.ops.Documents`, so no layer
        reads them back from the device) unless given its own. The layers need not know."""
        bound = copy.copy(self)
        bound.cu_seqlens = documents(cu_seqlens, "SequenceParallel.with_documents")
        return bound

    def with_layout(self, layout) -> "SequenceParallel":
        """This context with another layout (a name or a slot table, e.g. a planner's for one
        packed batch); the same group, methods and decisions."""
        bound = copy.copy(self)
        bound.layout = as_layout(layout, self.world, "SequenceParallel.with_layout")  # raises on a wrong table
        return bound

    def __repr__(self) -> str:
        return (f"SequenceParallel(world={self.world}, rank={self.rank}, linear={self.linear!r}, "
                f"softmax={self.softmax!r}, layout={self.layout!r})")

    def linear_attn(self, q, k, v, log_decay=None, causal: bool = True, scale=None, cu_seqlens=None,
                    output_final_state: bool = False):
        """[B, C, H, K|K|V] local shard -> [B, C, H, V] (see lasp2_linear_attn; cu_seqlens: the
        global offsets of packed documents, B = 1; output_final_state: (o, the state after the
        whole sequence [B, H, K, V], the same on every rank), for a prompt's prefill)."""
        name = self._choose(LINEAR, self.linear, q, v, log_decay, q.shape[2], q.shape[2],
                            (cu_seqlens if cu_seqlens is not None else self.cu_seqlens) is not None)
        return LINEAR_METHODS[name].fn(q, k, v, log_decay, scale=scale, causal=causal, group=self.group,
                                       chunk_size=self.chunk_size, validate=self.validate, layout=self.layout,
                                       **_documents(cu_seqlens, self.cu_seqlens),
                                       **_final_state(LINEAR, name, output_final_state))

    def softmax_attn(self, q, k, v, causal: bool = True, scale=None, cu_seqlens=None) -> torch.Tensor:
        """[B, C, Hq, D], [B, C, Hkv, D], [B, C, Hkv, Dv] local shard -> [B, C, Hq, Dv]
        (cu_seqlens: the global offsets of packed documents, B = 1)."""
        return SOFTMAX_METHODS[self.softmax].fn(q, k, v, causal=causal, scale=scale, group=self.group,
                                                layout=self.layout, validate=self.validate, **_documents(cu_seqlens, self.cu_seqlens))

    def delta_rule(self, q, k, v, beta, log_decay=None, scale=None, cu_seqlens=None, output_final_state: bool = False):
        """[B, C, Hk, K|K], [B, C, Hv, V], beta [B, C, Hv] local shard -> [B, C, Hv, V] (see
        lasp2_delta_rule; cu_seqlens: the global offsets of packed documents, B = 1;
        output_final_state: (o, the state after the whole sequence [B, Hv, K, V]))."""
        name = self._choose(DELTA, self.delta, q, v, log_decay, v.shape[2], q.shape[2], False)
        return DELTA_METHODS[name].fn(q, k, v, beta, log_decay, scale=scale, group=self.group,
                                      layout=self.layout, chunk_size=self.chunk_size, validate=self.validate,
                                      **_documents(cu_seqlens, self.cu_seqlens),
                                      **_final_state(DELTA, name, output_final_state))

    def causal_conv1d(self, x, weight, bias=None, activation="silu", cu_seqlens=None, output_final_state: bool = False):
        """[B, C, D] local shard -> [B, C, D]: the short depthwise convolution over the whole
        sequence (see lasp2.parallel.conv; output_final_state: (out, the sequence's last w−1
        inputs [B, w−1, D]))."""
        return causal_conv1d(x, weight, bias, activation=activation, group=self.group, layout=self.layout,
                             output_final_state=output_final_state, **_documents(cu_seqlens, self.cu_seqlens))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard(x, self.group, self.layout, dim)

    def unshard(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return unshard(x_local, self.group, self.layout, dim)

    def positions(self, seq_len: int, device=None, cu_seqlens=None) -> torch.Tensor:
        """[C] the global positions of this rank's tokens, or with cu_seqlens (packed documents)
        their positions within their documents (RoPE restarting at each document)."""
        pos = positions(seq_len, self.group, self.layout, device)
        return pos if cu_seqlens is None else documents(cu_seqlens, "positions", seq_len).positions(device)[pos]

    def check_seq_len(self, seq_len: int) -> None:
        """Raises unless a global length shards evenly in this layout (contiguous: W, zigzag: 2W)."""
        as_layout(self.layout, self.world).check_global_length(seq_len, "SequenceParallel")
