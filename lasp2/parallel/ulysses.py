"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards, attend, all-to-all back.

Rank j receives heads [j*H/W, (j+1)*H/W) of every rank's tokens, runs the single-device op on
the whole sequence for those heads, and returns each rank its tokens. Heads must divide by W.
Under GQA the KV heads split the same way when W divides them; when there are fewer KV heads
than ranks and W is a multiple of their count, each is replicated to the ranks whose query
heads use it. Per pass per rank: two all-to-alls (in and out), each moving (W-1)/W of what is
packed: B*C*(Hq*D + 2*Hkv'*D) in, B*C*Hq*Dv out, forward and backward alike.
"""
from __future__ import annotations

import torch

from ..ops.checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_TOKEN
from ..ops.chunk import chunk_linear_attn
from ..ops.delta_checks import DELTA_DECAY_REASON, DELTA_DECAYS
from ..ops.delta_chunk import chunk_delta_rule
from ..ops.precision import without_autocast
from ..ops.softmax_attn import softmax_attn
from .collectives import exchange_rows
from .inputs import check_delta_call, check_linear_call, check_softmax_call, wire_dtype
from .layout import to_global_order, to_rank_order
from .spec import DELTA, LINEAR, SOFTMAX, Comm, MethodSpec, Plan


def _to_head_shards(tensors, group, layout):
    """This rank's [B, C, H_i, ...] tensors -> [B, T, H_i / W, ...]: my heads, every token (a
    per-head [B, C, H] tensor such as a gate or beta travels as it is)."""
    world = layout.world
    rows = torch.cat([t.reshape(*t.shape[:2], world, -1).movedim(2, 0).reshape(world, -1) for t in tensors], dim=1)
    rows = exchange_rows(rows, group)  # row j: rank j's tokens, my heads
    out, offset = [], 0
    for t in tensors:
        (b, c, h), rest = t.shape[:3], t.shape[3:]
        n = t.numel() // world
        per_rank = rows[:, offset:offset + n].reshape(world, b, c, h // world, *rest)
        out.append(to_global_order(per_rank, layout))
        offset += n
    return out


def _to_sequence_shard(o, group, layout):
    """[B, T, h, D] my heads, every token -> [B, C, W*h, D]: every head, my tokens."""
    world = layout.world
    per_rank = to_rank_order(o, layout)  # [W, B, C, h, D]: rank j's tokens
    rows = exchange_rows(per_rank.reshape(world, -1), group)  # row j: my tokens, rank j's heads
    w, b, c, h, d = per_rank.shape
    return rows.view(w, b, c, h, d).permute(1, 2, 0, 3, 4).reshape(b, c, w * h, d)


def _heads_rule(num_heads: int, num_kv_heads: int, world: int) -> str | None:
    if num_heads % world:
        return f"{num_heads} heads do not divide among {world} ranks; Ulysses needs heads divisible by W"
    if num_kv_heads % world and world % num_kv_heads:
        return (f"{num_kv_heads} key/value heads can neither be split among {world} ranks (W divides them) nor "
                f"replicated to them (their count divides W)")
    return None


@without_autocast
def ulysses_attn(q, k, v, *, causal=True, scale=None, group=None, layout="contiguous", validate=False,
                 cu_seqlens=None):
    """DeepSpeed-Ulysses softmax attention; the signature of `allgather_attn`. Query heads must
    divide by W; KV heads must divide by W or divide W (then they are replicated). The
    communication is `SOFTMAX_SPEC.plan`. Packed documents (the global cu_seqlens): each rank
    holds whole rows of its heads, so the single-device masks apply."""
    call = check_softmax_call(SOFTMAX_SPEC, q, k, v, scale=scale, causal=causal, group=group, validate=validate,
                              layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return softmax_attn(q, k, v, causal=causal, scale=call.scale, cu_seqlens=call.documents)
    world, kv_heads = call.world, call.shape.num_kv_heads
    if kv_heads % world:  # fewer KV heads than ranks: replicate each to its ranks
        k, v = (x.repeat_interleave(world // kv_heads, dim=2) for x in (k, v))
    q_all, k_all, v_all = _to_head_shards([q, k, v], group, call.layout)
    o = softmax_attn(q_all, k_all, v_all, scale=call.scale, causal=causal, cu_seqlens=call.documents)
    return _to_sequence_shard(o, group, call.layout)


@without_autocast
def ulysses_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                        validate=False, layout="contiguous", cu_seqlens=None):
    """Ulysses for linear attention: all-to-all to head shards, the single-device chunked op on
    the whole sequence (packed documents: with the global cu_seqlens), all-to-all back; the
    signature of `lasp2_linear_attn`. Every decay form; heads must divide by W. The
    communication is `SPEC.plan`."""
    call = check_linear_call(SPEC, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                             chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                                 cu_seqlens=call.documents)[0]
    heads, kind = q.shape[2] // call.world, call.shape.decay
    dtype = wire_dtype(q, log_decay)
    travelling = [q, k, v] + ([log_decay] if kind in (DECAY_TOKEN, DECAY_CHANNEL) else [])
    q_all, k_all, v_all, *g_all = _to_head_shards([t.to(dtype) for t in travelling], group, call.layout)
    if kind == DECAY_HEAD:
        g = log_decay[call.rank * heads:(call.rank + 1) * heads]
    else:
        g = g_all[0] if g_all else None
    o, _ = chunk_linear_attn(q_all, k_all, v_all, g, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                             cu_seqlens=call.documents)
    return _to_sequence_shard(o.to(q.dtype), group, call.layout)


SOFTMAX_SPEC = MethodSpec(
    name="ulysses", family=SOFTMAX, fn=ulysses_attn, quadratic=True, heads_rule=_heads_rule, compute="sdpa_causal",
    plan=Plan(forward=(Comm("all_to_all", "B·C·(Hq·D + Hkv'·(D + Dv))", precision="input"),
                       Comm("all_to_all", "B·C·Hq·Dv", precision="input")),
              backward=(Comm("all_to_all", "B·C·Hq·Dv", precision="input"),
                        Comm("all_to_all", "B·C·(Hq·D + Hkv'·(D + Dv))", precision="input")), steps="4"),
    notes="Hq % W == 0; KV heads split (Hkv' = Hkv) when W divides them, else replicated to Hkv' = W when Hkv "
          "divides W",
)
SPEC = MethodSpec(
    name="ulysses", family=LINEAR, fn=ulysses_linear_attn, heads_rule=_heads_rule,
    plan=Plan(forward=(Comm("all_to_all", "B·C·H·(2·K + V + Gt)", precision="promoted"),
                       Comm("all_to_all", "B·C·H·V", precision="input")),
              backward=(Comm("all_to_all", "B·C·H·V", precision="input"),
                        Comm("all_to_all", "B·C·H·(2·K + V + Gt)", precision="promoted")), steps="4"),
    notes="H % W == 0; the single-device op on whole sequences of H/W heads",
)


def _key_heads_rule(num_value_heads: int, num_key_heads: int, world: int) -> str | None:
    if num_key_heads % world:
        return (f"{num_key_heads} key heads do not divide among {world} ranks; Ulysses needs key heads divisible by W "
                f"(each rank takes whole groups of value heads with their key head)")
    return None


@without_autocast
def ulysses_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, group=None, layout="contiguous", chunk_size=64,
                       validate=False, cu_seqlens=None):
    """DeepSpeed-Ulysses for the delta rule; the signature of `lasp2_delta_rule`. The key heads
    (and so the value heads) must divide by W; each rank runs `chunk_delta_rule` on whole
    sequences of its heads. The communication is `DELTA_SPEC.plan`."""
    call = check_delta_call(DELTA_SPEC, q, k, v, beta, log_decay, scale=scale, group=group, chunk_size=chunk_size,
                            validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return chunk_delta_rule(q, k, v, beta, log_decay, scale=call.scale, chunk_size=call.chunk_size,
                                cu_seqlens=call.documents)[0]
    dtype = torch.promote_types(wire_dtype(q, log_decay), beta.dtype)
    travelling = [q, k, v, beta] + ([] if log_decay is None else [log_decay])
    q_all, k_all, v_all, beta_all, *g_all = _to_head_shards([t.to(dtype) for t in travelling], group, call.layout)
    o, _ = chunk_delta_rule(q_all, k_all, v_all, beta_all, g_all[0] if g_all else None, scale=call.scale,
                            chunk_size=call.chunk_size, cu_seqlens=call.documents)
    return _to_sequence_shard(o.to(v.dtype), group, call.layout)


DELTA_SPEC = MethodSpec(
    name="ulysses", family=DELTA, fn=ulysses_delta_rule, heads_rule=_key_heads_rule,
    decays=DELTA_DECAYS, decay_reason=DELTA_DECAY_REASON,
    plan=Plan(forward=(Comm("all_to_all", "B·C·(2·Hk·K + H·(V + 1 + Gt))", precision="promoted"),
                       Comm("all_to_all", "B·C·H·V", precision="input")),
              backward=(Comm("all_to_all", "B·C·H·V", precision="input"),
                        Comm("all_to_all", "B·C·(2·Hk·K + H·(V + 1 + Gt))", precision="promoted")), steps="4"),
    notes="H: value heads, Hk: key heads, Hk % W == 0; the single-device op on whole sequences of 1/W of the heads",
)
