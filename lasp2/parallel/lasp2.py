"""LASP-2: sequence-parallel linear attention with one all-gather of K x V states per pass.

Rank t holds tokens [t*C, (t+1)*C) (any lengths, in rank order). Forward: compute the local
state M_t and chunk transition A_t, start an all-gather of (M_t, A_t), compute the local
(zero-initial-state) output while it travels, then add the term of the incoming state
S_in(t) = sum_{s<t} (prod_{s<r<t} A_r) M_s. Backward: gather dS_in(t), the gradient this rank's
outputs put on its incoming state, overlap it with the local backward, then add the terms of
dM_t = sum_{s>t} (prod_{t<r<s} A_r) dS_in(s). The scans over ranks run in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from ..ops import bidirectional as bi
from ..ops.boundary import final_state_grads, initial_state_grads, initial_state_output, total_decay
from ..ops.chunk_kernels import grad_pass, grad_state_pass, output_pass, state_pass
from ..ops.chunk_layout import ChunkedSeq
from ..ops.scan import prefix_scan, suffix_scan
from .comm import all_gather_async, group_rank_size
from .inputs import run_linear_method

def rank_slots(gathered: torch.Tensor, world: int, state_shape, decay_shape):
    """Unpack an all-gathered [W * n] buffer of (state, transition) pairs into
    states [B, H, W, K, V] and transitions [B, H, W, Kg] (None if there is no transition)."""
    rows = gathered.view(world, -1)
    n_state = rows.shape[1] if decay_shape is None else rows.shape[1] - torch.Size(decay_shape).numel()
    states = rows[:, :n_state].reshape(world, *state_shape).movedim(0, 2).contiguous()
    if decay_shape is None:
        return states, None
    decays = rows[:, n_state:].reshape(world, *decay_shape).movedim(0, 2).contiguous()
    return states, decays


class _Lasp2Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, kind, scale, chunk_size, group):
        rank, world = group_rank_size(group)
        x = ChunkedSeq.from_inputs(q, k, v, log_decay, kind, chunk_size)
        h_start, local_state = state_pass(x)  # M_t
        decay = total_decay(x)  # A_t, None without decay
        payload = local_state.flatten() if decay is None else torch.cat([local_state.flatten(), decay.flatten()])
        gathered, work = all_gather_async(payload, group)
        o = output_pass(x, h_start, scale)  # overlaps the all-gather
        work.wait()
        states, decays = rank_slots(gathered, world, local_state.shape, None if decay is None else decay.shape)
        incoming = prefix_scan(states, decays)[0][:, :, rank]  # S_in(t)
        o += initial_state_output(x, incoming, scale)
        x.save_for_backward(ctx, q, k, v, log_decay, incoming, decays)
        ctx.scale, ctx.group = scale, group
        return x.unchunk(o, q.dtype)

    @staticmethod
    def backward(ctx, do):
        x, (incoming, decays) = ChunkedSeq.from_ctx(ctx)
        rank, world = group_rank_size(ctx.group)
        do_hat = x.output_grad(do, ctx.scale)
        delta_after, d_incoming = grad_state_pass(x, do_hat)  # dS_in(t)
        gathered, work = all_gather_async(d_incoming.flatten(), ctx.group)
        h_start, _ = state_pass(x)  # the local backward overlaps the all-gather
        dq, dk, dv, dg = grad_pass(x, do_hat, h_start, delta_after)
        dq_in, dg_in = initial_state_grads(x, do_hat, incoming)
        work.wait()
        d_states, _ = rank_slots(gathered, world, d_incoming.shape, None)
        d_outgoing = suffix_scan(d_states, decays)[0][:, :, rank]  # dM_t
        dk_out, dv_out, dg_out, _ = final_state_grads(x, d_outgoing, incoming)
        dg = None if dg is None else dg + dg_in + dg_out
        return *x.input_grads(dq + dq_in, dk + dk_out, dv + dv_out, dg), None, None, None, None


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


def lasp2_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64, validate=False):
    """LASP-2 sequence-parallel linear attention over the ranks of `group`.

    Args:
        q: [B, C, H, K] this rank's contiguous shard of the queries (rank order = dist.get_rank(group)).
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
            with one extra all-gather of 9 float64 values per rank (a few microseconds on NVLink,
            one network latency across nodes), so that mismatched ranks raise the same
            ValueError instead of hanging or exchanging wrongly sized buffers. Off by default.

    Returns:
        o [B, C, H, V], this rank's shard of the output, in q's dtype. Exactly one all-gather in
        the forward (B*H*K*V + B*H*Kg values per rank; Kg = K for GLA gates, 1 for scalar decay,
        0 without decay) and one in the backward (B*H*K*V values per rank).
    """
    return run_linear_method(
        "lasp2_linear_attn", _Lasp2Causal, _Lasp2Bidirectional, q, k, v, log_decay,
        scale=scale, causal=causal, group=group, chunk_size=chunk_size, validate=validate,
    )
