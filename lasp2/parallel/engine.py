"""The shared engine of the state-passing methods (LASP-2, LASP-1): one autograd skeleton per
direction, with the exchange between ranks plugged in.

Causal (Alg. 2 forward / Alg. 4 backward of the LASP-2 paper, per rank and slot): the slot's
chunk states with a zero incoming state give its summary (M_t, A_t); the exchange starts
(LASP-2: the all-gather of every summary; LASP-1: the hops that need no remote state) and,
while that travels, the intra-chunk output is computed tile by tile; then the incoming state S_in arrives,
is folded into the chunk states with one element-wise step, and one inter-chunk matmul adds
its term. The backward mirrors it: each slot's gradient on its incoming state travels while the
query-side gradients are formed (from the chunk states the forward kept and its inputs, laid out
again); the gradient arriving on its outgoing state is folded into the chunk
gradients before the key-side matmuls. So a rank does the matmuls of the single-device op on
its tokens and nothing more.

How much runs before the wait is the device policy's (`ops.policy`): on the CPU ("poll") tiles
are computed until the exchange reports arrival, and the remaining tiles then run fused with
their inter-chunk term while in cache; on CUDA ("fixed") every tile's intra-chunk work is
enqueued before the wait, whatever the timing, so the kernel sequence is the same every step.

An exchange (`Exchange`: LASP-2's all-gather, LASP-1's relay, allscan's pipelined chain,
logscan's recursive doubling) brings each slot its incoming state and each slot's gradient on
its outgoing state; the math around it is the same for all of them.
A rank's slots are stacked into the batch: [S*B, C/S, H, D].
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..ops import bidirectional as bi
from ..ops.chunk import chunk_linear_attn
from ..ops.chunk_kernels import (add_incoming, add_outgoing_grad, grad_state_pass, intra_output, query_side_grads,
                                 state_pass, tiled_input_grads, tiled_outputs)
from ..ops.chunk_layout import ChunkedSeq
from ..ops.policy import policy_for, under_forward_policy
from ..ops.precision import without_autocast
from .comm import broadcast
from .inputs import check_linear_call
from .layout import from_segments, segments, to_segments, unsegment_grads
from .transitions import transition_for


class Exchange(Protocol):
    """How the ranks share the slots' summaries (one class per method: `lasp2.AllGatherSummaries`,
    `lasp1.Relay`, `allscan.PipelinedChain`, `logscan.DoublingScan`). It holds no tensor between
    the passes: what the backward needs (`kept`) is saved with the rest, so that activation
    checkpointing can drop it."""

    slots_per_rank: int  # slots a rank holds, stacked into its batch
    keeps_final: bool  # set before a prefill's start_forward: `final_state` is asked for after it

    def start_forward(self, h_end: torch.Tensor, a: torch.Tensor | None) -> "Pending":
        """h_end [S*B, H, K, V] each slot's state from zero, a [S*B, H, Kg] (dense: [S*B, H, K, K])
        or None its transition. wait() -> (S_in [S*B, H, K, V], kept: what the backward needs)."""

    def start_backward(self, d_in: torch.Tensor, kept) -> "Pending":
        """d_in [S*B, H, K, V] each slot's gradient on its incoming state. wait() -> the gradient
        on each slot's outgoing state."""

    def start_sum(self, local: torch.Tensor) -> "Pending":
        """Bidirectional: wait() -> the sum of the other ranks' `local`."""

    def final_state(self, leaving: torch.Tensor) -> torch.Tensor:
        """After a forward's wait(): leaving [S*B, H, K, V] the state after each of this rank's
        slots -> [B, H, K, V] the state after the whole sequence, the same on every rank (the
        prefill of generation; `keeps_final` was set before start_forward)."""


def broadcast_last_slot(group, layout, leaving: torch.Tensor) -> torch.Tensor:
    """`Exchange.final_state` for the exchanges that leave each slot's state on its rank: the
    rank holding the sequence's last slot broadcasts the state after it (one broadcast of
    B·H·K·V values)."""
    owner, rank = layout.slot_ranks()[-1], torch.distributed.get_rank(group)
    mine = layout.slots(rank)
    per_slot = leaving.view(len(mine), -1, *leaving.shape[1:])
    final = per_slot[mine.index(layout.n_slots - 1)] if rank == owner else torch.empty_like(per_slot[0])
    return broadcast(final, group, owner)


class Pending:
    """A started exchange: wait() waits for the communication (on CUDA: orders the compute
    stream after it, without blocking the host), then returns finish()."""

    def __init__(self, works, finish):
        self._works, self._finish = works, finish

    def arrived(self) -> bool:
        """True once the communication has completed (never for an exchange that communicates
        inside wait(), such as LASP-1's relay)."""
        return bool(self._works) and all(work.is_completed() for work in self._works)

    def wait(self):
        for work in self._works:
            work.wait()
        return self._finish()


def carried_and_kept(scan, kept):
    """An exchange's forward result: (the state entering each slot, `scan.wait()`, and what its
    backward needs)."""
    return scan.wait(), kept


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, kind, scale, chunk_size, exchange, final):
        S = exchange.slots_per_rank
        seg = segments(q, k, v, log_decay, S)
        x = ChunkedSeq.from_inputs(*seg, kind, chunk_size)
        h_start, h_end = state_pass(x)  # M_t: each slot's state from a zero incoming state
        pending = exchange.start_forward(h_end, x.total_decay)  # share [M_t, A_t], asynchronously
        policy = policy_for(q.device)
        tiles = x.tiles()
        intra = []  # O_intra = [(Q K^T) . Psi] V tile by tile while the states travel, at least one;
        for tile in tiles:  # polling: once they are here, the other tiles run fused with O_inter
            intra.append(intra_output(tile.x))
            if policy.polls and pending.arrived():
                break
        S_in, kept = pending.wait()  # M_{1:t-1} combined: the state entering each slot
        h_start, _ = add_incoming(x, h_start, None, S_in)
        o = from_segments(tiled_outputs(x, tiles, h_start, scale, intra), S)  # + O_inter = Q_hat S
        if final:  # inference only (checked): nothing is saved
            return o, exchange.final_state(exchange.transition.apply(x.total_decay, S_in) + h_end)
        x.save_for_backward(ctx, (q, k, v, log_decay), h_start, kept)
        ctx.scale, ctx.exchange, ctx.policy = scale, exchange, policy
        return o

    @staticmethod
    @without_autocast
    @under_forward_policy
    def backward(ctx, do):
        exchange, S = ctx.exchange, ctx.exchange.slots_per_rank
        x, (h_start, kept) = ChunkedSeq.from_ctx(ctx, lambda q, k, v, g: segments(q, k, v, g, S))
        do_hat = x.output_grad(to_segments(do, S), ctx.scale)
        delta_after, d_in = grad_state_pass(x, do_hat)  # dM_t: each slot's gradient on its S_in
        pending = exchange.start_backward(d_in, kept)  # share dM_t, asynchronously
        tiles = x.tiles()
        query_side = []  # tile by tile while the gradients travel (at least one), as in the forward
        for tile in tiles:
            query_side.append(query_side_grads(tile.x, tile.of(do_hat), tile.of(h_start)))
            if ctx.policy.polls and pending.arrived():
                break
        d_out = pending.wait()  # dM_{t+1:T} combined: the gradient on each slot's outgoing state
        delta_after, _ = add_outgoing_grad(x, delta_after, None, d_out)
        grads = tiled_input_grads(x, tiles, h_start, delta_after, do_hat, query_side)
        return (*unsegment_grads(grads, S), None, None, None, None, None)


class _Bidirectional(torch.autograd.Function):
    """o = scale * q (sum over every rank of k^T v). Nothing of the output is independent of the
    other ranks' states, so the forward waits for them; the backward forms dq meanwhile."""

    @staticmethod
    def forward(ctx, q, k, v, scale, exchange):
        local = bi.local_state(k, v)
        total = local + exchange.start_sum(local).wait()
        ctx.save_for_backward(q, k, v, total)
        ctx.scale, ctx.exchange = scale, exchange
        return bi.state_output(q, total, scale).to(q.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, do):
        q, k, v, total = ctx.saved_tensors
        d_local = bi.state_grad(q, do, ctx.scale)
        pending = ctx.exchange.start_sum(d_local)
        dq = bi.query_grad(do, total, ctx.scale)
        dk, dv = bi.key_value_grads(k, v, d_local + pending.wait())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def causal_state_passing(q, k, v, log_decay, *, kind: str, scale: float, chunk_size: int, exchange,
                         final: bool = False):
    """This rank's output [B, C, H, V] of causal linear attention, its slots' incoming states
    brought by `exchange`; final=True (inference): (output, the state after the whole sequence
    [B, H, K, V] on every rank)."""
    exchange.keeps_final = final
    return _Causal.apply(q, k, v, log_decay, kind, scale, chunk_size, exchange, final)


def check_final_state_call(fn: str, output_final_state: bool, inputs, causal: bool, packed) -> None:
    """output_final_state across ranks is for inference (a prompt's prefill): no gradient, one
    sequence per row, causal. Raises before any collective."""
    if not output_final_state:
        return
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError(f"{fn}: output_final_state=True across ranks is for inference (the prefill of generation); "
                         f"its gradient is not implemented: call it under torch.no_grad()")
    if not causal:
        raise ValueError(f"{fn}: output_final_state=True needs causal=True (a bidirectional layer has no final state)")
    if packed is not None:
        raise ValueError(f"{fn}: output_final_state=True with cu_seqlens (packed documents) is not supported across "
                         f"ranks")


def bidirectional_state_passing(q, k, v, *, scale: float, exchange) -> torch.Tensor:
    """This rank's output [B, C, H, V] of bidirectional linear attention; `exchange.start_sum`
    brings the other ranks' states."""
    return _Bidirectional.apply(q, k, v, scale, exchange)


def linear_by_state_passing(spec, make_exchange, q, k, v, log_decay, *, scale, causal, group, chunk_size, validate,
                            layout, cu_seqlens, output_final_state=False):
    """The body of every state-passing linear method (LASP-2, LASP-1, allscan, logscan): the
    inputs checked against `spec` before any collective, one device runs `chunk_linear_attn`,
    else this rank's slots with `make_exchange(group, layout, transition)` bringing the states.
    output_final_state=True: (output, final state [B, H, K, V], the same on every rank)."""
    call = check_linear_call(spec, q, k, v, log_decay, scale=scale, causal=causal, group=group, chunk_size=chunk_size,
                             validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        out = chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                                cu_seqlens=call.documents, output_final_state=output_final_state)
        return out if output_final_state else out[0]
    check_final_state_call(spec.fn.__name__, output_final_state, (q, k, v, log_decay), causal, call.packed)
    log_decay, kind = call.linear_decay(log_decay, q.dtype)  # packed documents: resets as decays
    exchange = make_exchange(group, call.layout, transition_for(kind))
    if not causal:  # every token sees every state: the layout does not matter
        return bidirectional_state_passing(q, k, v, scale=call.scale, exchange=exchange)
    return causal_state_passing(q, k, v, log_decay, kind=kind, scale=call.scale, chunk_size=call.chunk_size,
                                exchange=exchange, final=output_final_state)
