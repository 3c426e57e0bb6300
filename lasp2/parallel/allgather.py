"""All-gather sequence parallelism: gather the whole K and V, attend locally.

`allgather_attn` is LASP-2H's softmax path (the Llama 3 context-parallel recipe): the K/V heads
(only the KV heads under GQA) of every rank are all-gathered, the local queries attend to them
with the causal offsets of the layout, and the backward reduce-scatters dK and dV.

`allgather_linear_attn` is the paper's "Megatron-SP" baseline for linear attention: the same
gather, then the masked left product (Q K^T) V over the whole sequence, quadratic in length.
It expresses no decay, per-head or per-token decays (as a decay mask); per-channel gates raise.
"""
from __future__ import annotations

import torch

from ..ops.checks import DECAY_HEAD, DECAY_NONE, DECAY_TOKEN
from ..ops.left_product import head_decay_cumulative, left_product_linear_attn
from ..ops.softmax_attn import causal_mask, sdpa
from .collectives import gather_sequence
from .comm import group_rank_size
from .inputs import run_linear_method, run_softmax_method


def _allgather_attn(q, k, v, *, scale, causal, group, layout, shape):
    rank = group_rank_size(group)[0]
    k_all, v_all = gather_sequence([k, v], group, layout)  # one all-gather of the KV heads
    q_pos = layout.local_positions(rank, shape.seq_len // layout.slots_per_rank, q.device)
    mask = causal_mask(q_pos, torch.arange(k_all.shape[1], device=q.device)) if causal else None
    return sdpa(q, k_all, v_all, scale=scale, attn_mask=mask)


def allgather_attn(q, k, v, *, causal=True, scale=None, group=None, layout="contiguous", validate=False):
    """Softmax attention across the ranks of `group` by all-gathering K and V.

    Args:
        q: [B, C, Hq, D] this rank's shard (layout order); k: [B, C, Hkv, D]; v: [B, C, Hkv, Dv],
            Hq % Hkv == 0. Every rank's shard has the same length C.
        causal: mask by global positions (the layout's offsets); False attends to everything.
        scale: None means D ** -0.5.
        group: None or a group of one runs single-device attention.
        layout: "contiguous" or "zigzag" (C even).
        validate: compare shapes, dtype, causal and scale across the group first (one small
            all-gather) so that mismatched ranks raise instead of hanging.
    Returns:
        [B, C, Hq, Dv]. Per pass: forward one all-gather of B*C*Hkv*(D+Dv) values per rank;
        backward one reduce-scatter of W times that.
    """
    return run_softmax_method("allgather_attn", _allgather_attn, q, k, v, scale=scale, causal=causal,
                              group=group, validate=validate, layout=layout)


def _allgather_linear(q, k, v, log_decay, *, kind, scale, causal, chunk_size, group, layout):
    rank = group_rank_size(group)[0]
    travelling = [k, v] + ([log_decay] if kind == DECAY_TOKEN else [])
    k_all, v_all, *g_all = gather_sequence(travelling, group, layout)  # one all-gather
    q_pos = layout.local_positions(rank, q.shape[1] // layout.slots_per_rank, q.device)
    k_pos = torch.arange(k_all.shape[1], device=q.device)
    Gq = Gk = None
    if kind == DECAY_HEAD:
        Gq, Gk = head_decay_cumulative(log_decay, q_pos), head_decay_cumulative(log_decay, k_pos)
    elif kind == DECAY_TOKEN:
        Gk = torch.cumsum(g_all[0].to(torch.float64), dim=1)  # [B, T, H], fp64: exact differences
        Gq = Gk[:, q_pos]
    o = left_product_linear_attn(q, k_all, v_all, q_pos, k_pos, causal=causal, scale=scale, Gq=Gq, Gk=Gk)
    return o.to(q.dtype)


def allgather_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                          validate=False, layout="contiguous"):
    """Megatron-style sequence parallelism for linear attention (the paper's baseline): gather the
    full-length K and V (and per-token decays), compute the masked left product locally.

    Same signature as `lasp2_linear_attn` (chunk_size is unused). Supports log_decay None, [H]
    and [B, C, H]; [B, C, H, K] raises. Per pass: forward one all-gather of B*C*H*(K+V) (+B*C*H
    for per-token decay) values per rank; backward one reduce-scatter of W times that.
    """
    return run_linear_method(
        "allgather_linear_attn", _allgather_linear, q, k, v, log_decay, scale=scale, causal=causal,
        group=group, chunk_size=chunk_size, validate=validate, layout=layout,
        decays=(DECAY_NONE, DECAY_HEAD, DECAY_TOKEN), equal_lengths=True,
    )
