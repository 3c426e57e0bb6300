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

from ..ops.checks import DECAY_HEAD, DECAY_KINDS
from ..ops.chunk import chunk_linear_attn
from ..ops.softmax_attn import sdpa
from .collectives import exchange_rows
from .comm import group_rank_size
from .inputs import run_linear_method, run_softmax_method
from .layout import to_global_order, to_rank_order


def _to_head_shards(tensors, group, layout):
    """This rank's [B, C, H_i, D_i] tensors -> [B, T, H_i / W, D_i]: my heads, every token."""
    world = layout.world
    rows = torch.cat([t.reshape(*t.shape[:2], world, -1).movedim(2, 0).reshape(world, -1) for t in tensors], dim=1)
    rows = exchange_rows(rows, group)  # row j: rank j's tokens, my heads
    out, offset = [], 0
    for t in tensors:
        b, c, h, d = t.shape
        n = b * c * (h // world) * d
        per_rank = rows[:, offset:offset + n].reshape(world, b, c, h // world, d)
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


def _check_heads(fn):
    def check(shape, world):
        hq, hkv = shape.num_heads, getattr(shape, "num_kv_heads", shape.num_heads)
        if hq % world:
            raise ValueError(f"{fn}: {hq} heads do not divide among {world} ranks; Ulysses needs heads divisible by W")
        if hkv % world and world % hkv:
            raise ValueError(
                f"{fn}: {hkv} key/value heads can neither be split among {world} ranks (W divides them) nor "
                f"replicated to them (their count divides W)"
            )
    return check


def _ulysses_attn(q, k, v, *, scale, causal, group, layout, shape):
    world = layout.world
    if shape.num_kv_heads % world:  # fewer KV heads than ranks: replicate each to its ranks
        k, v = (x.repeat_interleave(world // shape.num_kv_heads, dim=2) for x in (k, v))
    q_all, k_all, v_all = _to_head_shards([q, k, v], group, layout)
    return _to_sequence_shard(sdpa(q_all, k_all, v_all, scale=scale, is_causal=causal), group, layout)


def ulysses_attn(q, k, v, *, causal=True, scale=None, group=None, layout="contiguous", validate=False):
    """DeepSpeed-Ulysses softmax attention; the signature of `allgather_attn`. Query heads must
    divide by W; KV heads must divide by W or divide W (then they are replicated)."""
    return run_softmax_method("ulysses_attn", _ulysses_attn, q, k, v, scale=scale, causal=causal, group=group,
                              validate=validate, layout=layout, heads_check=_check_heads("ulysses_attn"))


def _ulysses_linear(q, k, v, log_decay, *, kind, scale, causal, chunk_size, group, layout):
    rank, world = group_rank_size(group)
    heads = q.shape[2] // world
    travelling = [q, k, v]
    if log_decay is not None and kind != DECAY_HEAD:
        travelling.append(log_decay if log_decay.dim() == 4 else log_decay.unsqueeze(-1))
    q_all, k_all, v_all, *g_all = _to_head_shards(travelling, group, layout)
    if kind == DECAY_HEAD:
        g = log_decay[rank * heads:(rank + 1) * heads]
    else:
        g = None if not g_all else (g_all[0] if log_decay.dim() == 4 else g_all[0].squeeze(-1))
    o, _ = chunk_linear_attn(q_all, k_all, v_all, g, scale=scale, causal=causal, chunk_size=chunk_size)
    return _to_sequence_shard(o, group, layout)


def ulysses_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                        validate=False, layout="contiguous"):
    """Ulysses for linear attention: all-to-all to head shards, the single-device chunked op on
    the whole sequence, all-to-all back; the signature of `lasp2_linear_attn`. Every decay form;
    heads must divide by W. Per pass: two all-to-alls (q, k, v and per-token decays in; o out)."""
    return run_linear_method(
        "ulysses_linear_attn", _ulysses_linear, q, k, v, log_decay, scale=scale, causal=causal, group=group,
        chunk_size=chunk_size, validate=validate, layout=layout, decays=DECAY_KINDS, equal_lengths=True,
        heads_check=_check_heads("ulysses_linear_attn"),
    )
