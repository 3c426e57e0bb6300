"""All-gather sequence parallelism: gather the whole K and V, attend locally.

`allgather_attn` is LASP-2H's softmax path (the Llama 3 context-parallel recipe): the K/V heads
(only the KV heads under GQA) of every rank are all-gathered, the local queries attend to them
with the causal offsets of the layout, and the backward reduce-scatters dK and dV. Each of the
rank's slots (one, or two for zigzag) attends to the keys up to its own end, causal and aligned
bottom-right (`ops.softmax_attn.sdpa`), so on GPU torch's fused kernels apply (flash attention
takes no explicit mask).

`allgather_linear_attn` is the paper's "Megatron-SP" baseline for linear attention: the same
gather, then the masked left product (Q K^T) V over the whole sequence, quadratic in length.
It expresses no decay, per-head or per-token decays (as a decay mask); per-channel gates raise.
"""
from __future__ import annotations

import torch

from ..ops.checks import DECAY_HEAD, DECAY_NONE, DECAY_TOKEN
from ..ops.chunk import chunk_linear_attn
from ..ops.left_product import head_decay_cumulative, left_product_linear_attn
from ..ops.precision import without_autocast
from ..ops.softmax_attn import sdpa, softmax_attn, visibility
from .collectives import gather_sequence
from .inputs import check_linear_call, check_softmax_call, wire_dtype
from .spec import LINEAR, SOFTMAX, Comm, MethodSpec, Plan


@without_autocast
def allgather_attn(q, k, v, *, causal=True, scale=None, group=None, layout="contiguous", validate=False,
                   cu_seqlens=None):
    """Softmax attention across the ranks of `group` by all-gathering K and V.

    Args:
        q: [B, C, Hq, D] this rank's shard (layout order); k: [B, C, Hkv, D]; v: [B, C, Hkv, Dv],
            Hq % Hkv == 0. Every rank's shard has the same length C.
        causal: mask by global positions (the layout's offsets); False attends to everything.
        scale: None means D ** -0.5.
        group: None or a group of one runs single-device attention.
        layout: "contiguous", "zigzag" (C even) or a slot table (`layout.slot_table`; C a multiple of its S).
        validate: compare shapes, dtype, causal and scale across the group first (one small
            all-gather) so that mismatched ranks raise instead of hanging.
        cu_seqlens: None, or the global [N + 1] int64 offsets of documents packed in the row
            (B = 1, equal shards): a query sees only its own document's keys; a slot attends
            from the start of its first query's document, the keys before it skipped.
    Returns:
        [B, C, Hq, Dv]. The communication is `SOFTMAX_SPEC.plan` (the README's method table).
    """
    call = check_softmax_call(SOFTMAX_SPEC, q, k, v, scale=scale, causal=causal, group=group, validate=validate,
                              layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return softmax_attn(q, k, v, causal=causal, scale=call.scale, cu_seqlens=call.documents)
    k_all, v_all = gather_sequence([k, v], group, call.layout)  # one all-gather of the KV heads
    packed = call.packed
    if not causal and packed is None:
        return sdpa(q, k_all, v_all, scale=call.scale)
    slot_len = call.shape.seq_len // call.layout.slots_per_rank
    outputs = []
    for index, slot in enumerate(call.layout.slots(call.rank)):  # the keys up to the slot's end
        q_slot = q[:, index * slot_len:(index + 1) * slot_len]
        start, end = 0, ((slot + 1) * slot_len if causal else k_all.shape[1])
        if packed is None:
            outputs.append(sdpa(q_slot, k_all[:, :end], v_all[:, :end], scale=call.scale, causal=True))
            continue
        q_pos = packed.positions[index * slot_len:(index + 1) * slot_len]
        if causal:  # keys before the first query's document are no query's: skipped (host arithmetic)
            start = packed.documents.start_of(slot * slot_len)
        k_pos = torch.arange(start, end, device=q.device)
        mask = visibility(q_pos, k_pos, causal, packed.doc_ids[q_pos], packed.doc_ids[k_pos])
        outputs.append(sdpa(q_slot, k_all[:, start:end], v_all[:, start:end], scale=call.scale, mask=mask))
    return torch.cat(outputs, dim=1)


@without_autocast
def allgather_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                          validate=False, layout="contiguous", cu_seqlens=None):
    """Megatron-style sequence parallelism for linear attention (the paper's baseline): gather the
    full-length K and V (and per-token decays), compute the masked left product locally.

    Same signature as `lasp2_linear_attn` (chunk_size is used only on one device). Supports
    log_decay None, [H] and [B, C, H]. The communication is `SPEC.plan`.
    """
    call = check_linear_call(SPEC, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                             chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                                 cu_seqlens=call.documents)[0]
    kind, dtype = call.shape.decay, wire_dtype(q, log_decay)
    travelling = [k.to(dtype), v.to(dtype)] + ([log_decay.to(dtype)] if kind == DECAY_TOKEN else [])
    k_all, v_all, *g_all = gather_sequence(travelling, group, call.layout)  # one all-gather
    q_pos = call.layout.local_positions(call.rank, q.shape[1] // call.layout.slots_per_rank, q.device)
    k_pos = torch.arange(k_all.shape[1], device=q.device)
    Gq = Gk = None
    if kind == DECAY_HEAD:
        Gq, Gk = head_decay_cumulative(log_decay, q_pos), head_decay_cumulative(log_decay, k_pos)
    elif kind == DECAY_TOKEN:
        Gk = torch.cumsum(g_all[0].to(torch.float64), dim=1)  # [B, T, H], fp64: exact differences
        Gq = Gk[:, q_pos]
    q_doc, k_doc = (None, None) if call.packed is None else (call.packed.doc_ids[q_pos], call.packed.doc_ids)
    o = left_product_linear_attn(q, k_all, v_all, q_pos, k_pos, causal=causal, scale=call.scale, Gq=Gq, Gk=Gk,
                                 q_doc=q_doc, k_doc=k_doc)
    return o.to(q.dtype)


SOFTMAX_SPEC = MethodSpec(
    name="allgather", family=SOFTMAX, fn=allgather_attn, quadratic=True, compute="sdpa_bottom_right",
    plan=Plan(forward=(Comm("all_gather", "B·C·Hkv·(D + Dv)", precision="input"),),
              backward=(Comm("reduce_scatter", "W·B·C·Hkv·(D + Dv)", precision="input"),), steps="2"),
    notes="LASP-2H's softmax path; only the KV heads travel; fused kernels with a bottom-right causal mask",
)
SPEC = MethodSpec(
    name="allgather", family=LINEAR, fn=allgather_linear_attn, quadratic=True, compute="left_product",
    decays=(DECAY_NONE, DECAY_HEAD, DECAY_TOKEN),
    decay_reason="per-channel gates cannot be written as the masked (Q K^T) V it computes",
    plan=Plan(forward=(Comm("all_gather", "B·C·H·(K + V + Gt)", precision="promoted"),),
              backward=(Comm("reduce_scatter", "W·B·C·H·(K + V + Gt)", precision="promoted"),), steps="2"),
    notes="Megatron-SP: full K/V on every rank, the masked left product",
)
