"""allscan: LASP-1's chain, pipelined (ZeCO's All-Scan, arXiv 2507.01004, for every transition kind).

The state entering slot t+1 is A_t S_in(t) + M_t, and A acts on the K rows only, so each block
of V columns follows the same recurrence on its own (see the shared design notes, "Scale"). A
rank therefore posts a receive for every column block of its incoming state, and combines and
forwards each block as soon as it arrives: block b of rank t+1 travels while rank t still
waits for block b+1. With P blocks a pass takes about (hops + P − 1) block hops instead of
hops whole-state ones, and the bytes through a rank stay one state in and one out, flat in W
(LASP-2's all-gather receives W−1 summaries). As in LASP-1, the hops that need no remote state
leave before the local intra-chunk compute, and the rest run when the engine waits for the
incoming state, after it; the backward pipelines the gradient chain the other way, with the
transposed transitions; the bidirectional form pipelines a prefix and a suffix chain of
partial sums. ZeCO cuts along K, which only works for diagonal transitions; cutting along V
also carries the delta rule's dense K x K one (`delta.py`'s engine, `ALLSCAN_DELTA_SPEC`).
"""
from __future__ import annotations

import functools

from ..ops.delta_checks import DELTA_DECAY_REASON, DELTA_DECAYS
from ..ops.precision import without_autocast
from .delta import delta_by_state_passing
from .engine import linear_by_state_passing
from .lasp1 import Relay
from .layout import Layout
from .spec import DELTA, LAST_SLOT_BROADCAST, LINEAR, Comm, MethodSpec, Plan, column_blocks
from .transitions import Transition

# The most column blocks a hop is cut into (P: the largest divisor of V not above it). More
# blocks shorten the pipeline's fill and drain and add one message latency each.
BLOCKS = 8


class PipelinedChain(Relay):
    """The exchange of allscan (`engine.Exchange`): LASP-1's relay with every hop cut into P
    column blocks, each combined and forwarded as soon as it arrives."""

    def __init__(self, group, layout: Layout, transition: Transition, value_dim: int):
        super().__init__(group, layout, transition, blocks=column_blocks(value_dim, BLOCKS))


@without_autocast
def allscan_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                        validate=False, layout="contiguous", cu_seqlens=None,
                        output_final_state=False):
    """allscan sequence-parallel linear attention; the signature and results of
    `lasp2_linear_attn`, with the incoming states carried by a pipelined chain of column blocks.
    The communication is `SPEC.plan` (the README's method table)."""
    exchange = functools.partial(PipelinedChain, value_dim=v.shape[-1])
    return linear_by_state_passing(SPEC, exchange, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                                   chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens,
                                   output_final_state=output_final_state)


@without_autocast
def allscan_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                       validate=False, cu_seqlens=None,
                       output_final_state=False):
    """allscan for the delta rule: the signature and results of `lasp2_delta_rule`, the
    incoming states carried by a pipelined chain of column blocks (the dense maps stay on their
    ranks). The communication is `DELTA_SPEC.plan`."""
    exchange = functools.partial(PipelinedChain, value_dim=v.shape[-1])
    return delta_by_state_passing(DELTA_SPEC, exchange, q, k, v, beta, log_decay, scale=scale, group=group,
                                  layout=layout, chunk_size=chunk_size, validate=validate, cu_seqlens=cu_seqlens,
                                  output_final_state=output_final_state)


def _pipelined(values: str, count: str, chain: str, over: str = "slots") -> Comm:
    return Comm("send", values, count, chain=chain, over=over, pieces="P")


_PREFIX_AND_SUFFIX = (_pipelined("B·H·K·V/P", "W−1", "up", "ranks"), _pipelined("B·H·K·V/P", "W−1", "down", "ranks"))
SPEC = MethodSpec(
    name="allscan", family=LINEAR, fn=allscan_linear_attn, equal_shards=False, blocks=BLOCKS,
    final_state=LAST_SLOT_BROADCAST,
    plan=Plan(forward=(_pipelined("B·H·K·V/P", "S·(W−1)", "up"),), backward=(_pipelined("B·H·K·V/P", "S·(W−1)", "down"),),
              steps="2·(S·(W−1) + P − 1)", overlap="the intra-chunk compute for the first hop only (a chain)"),
    bidirectional=Plan(forward=_PREFIX_AND_SUFFIX, backward=_PREFIX_AND_SUFFIX, steps="4·(W − 1 + P − 1)"),
    notes="P = the largest divisor of V up to 8; steps counted in block hops; bytes through a rank flat in W",
)
DELTA_SPEC = MethodSpec(
    name="allscan", family=DELTA, fn=allscan_delta_rule, equal_shards=False, blocks=BLOCKS, decays=DELTA_DECAYS,
    final_state=LAST_SLOT_BROADCAST,
    decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(_pipelined("B·H·K·V/P", "S·(W−1)", "up"),), backward=(_pipelined("B·H·K·V/P", "S·(W−1)", "down"),),
              steps="2·(S·(W−1) + P − 1)", overlap="the outputs from a zero state for the first hop only (a chain)"),
    notes="H: value heads; P = the largest divisor of V up to 8; the dense maps stay on their ranks",
)
