"""LASP-2: sequence-parallel linear attention with one all-gather of K x V states per pass.

The sequence is cut into slots in order (the layout: one slot per rank, or two for zigzag);
a rank's slots are stacked into its batch. Forward: compute each slot's local state M_s and
transition A_s, start an all-gather of them, compute the local (zero-initial-state) output while
it travels, then add the term of each slot's incoming state S_in(s) = sum_{u<s} (prod_{u<r<s}
A_r) M_u. Backward: gather dS_in(s), the gradient the slot's outputs put on its incoming state,
overlap it with the local backward, then add the terms of dM_s = sum_{u>s} (prod_{s<r<u} A_r)
dS_in(u). The scans over slots run in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from ..ops.precision import without_autocast
from ..ops import bidirectional as bi
from ..ops.boundary import final_state_grads, initial_state_grads, initial_state_output, total_decay
from ..ops.chunk_kernels import grad_pass, grad_state_pass, output_pass, state_pass
from ..ops.chunk_layout import ChunkedSeq
from ..ops.scan import prefix_scan, suffix_scan
from .comm import all_gather_async, group_rank_size
from .inputs import run_linear_method
from .layout import from_segments, segments, slots_in_order, to_segments, unsegment_grads

def slot_states(gathered: torch.Tensor, lay, state_shape, decay_shape):
    """Unpack an all-gathered [W * n] buffer of every rank's (states, transitions) for its S
    slots into sequence order: states [B, H, n_slots, K, V], transitions [B, H, n_slots, Kg]
    (None without decay). state_shape is [S*B, H, K, V], decay_shape [S*B, H, Kg]."""
    rows = gathered.view(lay.world, -1)
    n_state = torch.Size(state_shape).numel()
    S = lay.slots_per_rank

    def ordered(part, shape):
        per_rank = part.reshape(lay.world, S, shape[0] // S, *shape[1:])
        return slots_in_order(per_rank, lay).movedim(0, 2).contiguous()

    states = ordered(rows[:, :n_state], state_shape)
    return states, None if decay_shape is None else ordered(rows[:, n_state:], decay_shape)


def mine(per_slot: torch.Tensor, lay, rank: int) -> torch.Tensor:
    """[B, H, n_slots, ...] -> this rank's slots stacked into the batch, [S*B, H, ...]."""
    return torch.cat([per_slot[:, :, s] for s in lay.slots(rank)])


class _Lasp2Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, kind, scale, chunk_size, group, lay):
        rank = group_rank_size(group)[0]
        S = lay.slots_per_rank  # a rank's slots are stacked into the batch: [S*B, C/S, H, D]
        seg = segments(q, k, v, log_decay, S)
        x = ChunkedSeq.from_inputs(*seg, kind, chunk_size)
        h_start, local_state = state_pass(x)  # M for each of this rank's slots
        decay = total_decay(x)  # A for each slot, None without decay
        payload = local_state.flatten() if decay is None else torch.cat([local_state.flatten(), decay.flatten()])
        gathered, work = all_gather_async(payload, group)
        o = output_pass(x, h_start, scale)  # overlaps the all-gather
        work.wait()
        states, decays = slot_states(gathered, lay, local_state.shape, None if decay is None else decay.shape)
        incoming = mine(prefix_scan(states, decays)[0], lay, rank)  # S_in of each slot
        o += initial_state_output(x, incoming, scale)
        x.save_for_backward(ctx, *seg, incoming, decays)
        ctx.scale, ctx.group, ctx.lay = scale, group, lay
        return from_segments(x.unchunk(o, q.dtype), S)

    @staticmethod
    @without_autocast
    def backward(ctx, do):
        x, (incoming, decays) = ChunkedSeq.from_ctx(ctx)
        group, lay = ctx.group, ctx.lay
        rank, S = group_rank_size(group)[0], lay.slots_per_rank
        do_hat = x.output_grad(to_segments(do, S), ctx.scale)
        delta_after, d_incoming = grad_state_pass(x, do_hat)  # dS_in of each slot
        gathered, work = all_gather_async(d_incoming.flatten(), group)
        h_start, _ = state_pass(x)  # the local backward overlaps the all-gather
        dq, dk, dv, dg = grad_pass(x, do_hat, h_start, delta_after)
        dq_in, dg_in = initial_state_grads(x, do_hat, incoming)
        work.wait()
        d_states, _ = slot_states(gathered, lay, d_incoming.shape, None)
        d_outgoing = mine(suffix_scan(d_states, decays)[0], lay, rank)  # dM of each slot
        dk_out, dv_out, dg_out, _ = final_state_grads(x, d_outgoing, incoming)
        dg = None if dg is None else dg + dg_in + dg_out
        grads = x.input_grads(dq + dq_in, dk + dk_out, dv + dv_out, dg)
        return (*unsegment_grads(grads, S), None, None, None, None, None)


class _Lasp2Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        rank, world = group_rank_size(group)
        local_state = bi.local_state(k, v)
        gathered, work = all_gather_async(local_state.flatten(), group)
        o = bi.state_output(q, local_state, scale)  # this rank's own keys, while the gather runs
        work.wait()
        states = gathered.view(world, *local_state.shape)
        others = sum(states[s] for s in range(world) if s != rank)
        o += bi.state_output(q, others, scale)
        ctx.save_for_backward(q, k, v, local_state + others)
        ctx.meta = (scale, group)
        return o.to(q.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, do):
        q, k, v, total_state = ctx.saved_tensors
        scale, group = ctx.meta
        rank, world = group_rank_size(group)
        d_local = bi.state_grad(q, do, scale)
        gathered, work = all_gather_async(d_local.flatten(), group)
        dq = bi.query_grad(do, total_state, scale)
        dk, dv = bi.key_value_grads(k, v, d_local)
        work.wait()
        d_states = gathered.view(world, *d_local.shape)
        dk_o, dv_o = bi.key_value_grads(k, v, sum(d_states[s] for s in range(world) if s != rank))
        return dq.to(q.dtype), (dk + dk_o).to(k.dtype), (dv + dv_o).to(v.dtype), None, None


def _lasp2(q, k, v, log_decay, *, kind, scale, causal, chunk_size, group, layout):
    if not causal:  # every token sees every state: the layout does not matter
        return _Lasp2Bidirectional.apply(q, k, v, scale, group)
    return _Lasp2Causal.apply(q, k, v, log_decay, kind, scale, chunk_size, group, layout)


def lasp2_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                      validate=False, layout="contiguous"):
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
        validate: first compare B, H, K, V, dtype, decay form, causal and scale across the group
            with one extra all-gather of 9 float64 values per rank (one collective latency), so
            that mismatched ranks raise the same ValueError instead of hanging or exchanging
            wrongly sized buffers. Off by default.
        layout: "contiguous" (shards may differ in length) or "zigzag" (even local length).

    Returns:
        o [B, C, H, V], this rank's shard of the output, in q's dtype. Exactly one all-gather in
        the forward (S*B*H*K*V + S*B*H*Kg values per rank; S = 1 contiguous, 2 zigzag; Kg = K
        for GLA gates, 1 for scalar decay, 0 without) and one in the backward (S*B*H*K*V).
    """
    return run_linear_method(
        "lasp2_linear_attn", _lasp2, q, k, v, log_decay, scale=scale, causal=causal, group=group,
        chunk_size=chunk_size, validate=validate, layout=layout,
    )
