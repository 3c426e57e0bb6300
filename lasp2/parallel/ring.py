"""Ring Attention: K/V blocks travel around the ring of ranks while each computes against them.

At step s rank r holds the K/V block of rank r-s; the next block is already in flight
(batch_isend_irecv) while the current one is computed. Blocks no query can see (causal,
all keys later) are passed on without compute. The backward recomputes each block under
autograd: dQ accumulates locally, dK/dV travel with their block and arrive at its owner after W
hops. Per pass per rank: forward W-1 exchanges of the K/V block; backward W-1 of the K/V block
and W of its gradient.

K/V blocks travel in the input dtype; each block is computed, and the gradients that travel
with it are accumulated, in fp32 (fp64 for fp64 inputs). `ring_attn` merges softmax blocks with
a stable log-sum-exp. `ring_linear_attn` is the paper's Ring Attention baseline for linear
attention: the masked left product (Q K_b^T) V_b per block, summed, without the right-product
trick. Per-token decays need the cumulative decay at each slot start: one extra small all-gather
forward (reduce-scatter backward) of B*H values per slot.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.checks import DECAY_HEAD, DECAY_NONE, DECAY_TOKEN, compute_dtype
from ..ops.chunk import chunk_linear_attn
from ..ops.left_product import head_decay_cumulative, left_product_linear_attn
from ..ops.policy import policy_for, under_forward_policy
from ..ops.precision import without_autocast
from ..ops.scan import exclusive_cumsum
from ..ops.softmax_attn import attention_block, merge_blocks, softmax_attn
from .collectives import gather_rows
from .comm import ring_exchange
from .inputs import check_linear_call, check_softmax_call, wire_dtype
from .layout import slots_in_order
from .spec import LINEAR, SOFTMAX, Comm, MethodSpec, Plan

KV_TAG, GRAD_TAG = 0, 1


class _Ring(torch.autograd.Function):
    """o = combination over the W key blocks of blocks.block(q_side, kv_block, source rank)."""

    @staticmethod
    def forward(ctx, blocks, group, kv, *q_side):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        o = lse = None
        current = kv
        for step in range(world):
            src = (rank - step) % world
            if step + 1 < world:
                arriving, handle = ring_exchange(current, group, KV_TAG)  # overlaps this block
            if blocks.visible(src):
                result = blocks.block(q_side, current, src)
                if blocks.softmax:
                    o, lse = result if o is None else merge_blocks(o, lse, *result)
                else:
                    o = result[0] if o is None else o + result[0]
            if step + 1 < world:
                handle.wait()
                current = arriving
        ctx.blocks, ctx.group, ctx.policy = blocks, group, policy_for(kv.device)
        ctx.save_for_backward(kv, o, lse, *q_side)
        return o

    @staticmethod
    @without_autocast
    @under_forward_policy
    def backward(ctx, do):
        kv, o, lse, *q_side = ctx.saved_tensors
        blocks, group = ctx.blocks, ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dtype = compute_dtype(kv.dtype)
        wants = ctx.needs_input_grad[3:]
        leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(q_side, wants)]
        d_q_side = [None if t is None or not w else torch.zeros_like(t) for t, w in zip(q_side, wants)]
        current, pending, grad_handle = kv, None, None
        for step in range(world):
            src = (rank - step) % world
            if step + 1 < world:
                arriving, kv_handle = ring_exchange(current, group, KV_TAG)
            d_block = None
            if blocks.visible(src):
                with torch.enable_grad():
                    kv_leaf = current.detach().to(dtype).requires_grad_(True)  # its gradient accumulates in fp32
                    result = blocks.block(leaves, kv_leaf, src)
                    inputs = [kv_leaf] + [t for t in leaves if t is not None and t.requires_grad]
                    grads = torch.autograd.grad(result, inputs, _block_output_grads(result, o, lse, do), allow_unused=True)
                d_block, rest = grads[0], iter(grads[1:])
                for i, t in enumerate(leaves):
                    if t is not None and t.requires_grad:
                        g = next(rest)
                        if g is not None:
                            d_q_side[i] += g
            if grad_handle is not None:
                grad_handle.wait()  # the gradient of the block arriving with `current`
            d_kv = _add_or_zeros(pending, d_block, kv, dtype)
            pending, grad_handle = ring_exchange(d_kv, group, GRAD_TAG)  # the block's gradient moves on
            if step + 1 < world:
                kv_handle.wait()
                current = arriving
        grad_handle.wait()  # after W hops, the gradient of this rank's own block
        return (None, None, pending.to(kv.dtype), *d_q_side)


def _add_or_zeros(a, b, like, dtype):
    if a is None and b is None:
        return torch.zeros_like(like, dtype=dtype)
    return b if a is None else (a if b is None else a + b)


def _block_output_grads(result, o, lse, do):
    """dL/d(block outputs): for softmax blocks o = sum_b w_b o_b with w_b = exp(lse_b - lse)."""
    if lse is None:
        return (do,)
    o_b, lse_b = result
    w = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - lse), torch.zeros_like(lse_b)).detach()
    return w.unsqueeze(-1) * do, w * (do * (o_b.detach() - o)).sum(dim=-1)


class _Blocks:
    """What the local queries compute against one travelling block."""

    def __init__(self, layout, rank, slot_len, shapes, causal, scale, device, packed=None):
        self.layout, self.rank, self.slot_len, self.shapes = layout, rank, slot_len, shapes
        self.causal, self.scale = causal, scale
        self.q_pos = layout.local_positions(rank, slot_len, device)
        self.device = device
        self.docs = None if packed is None else packed.documents  # packed documents, else None
        self.doc_ids = None if packed is None else packed.doc_ids  # the document of every global position
        self.q_doc = None if packed is None else self.doc_ids[self.q_pos]

    def positions(self, src):
        return self.layout.local_positions(src, self.slot_len, self.device)

    def documents(self, k_pos):
        return None if self.doc_ids is None else self.doc_ids[k_pos]

    def span(self, rank) -> tuple[int, int]:
        """(first, last) global position of a rank's tokens, from the layout (host arithmetic)."""
        slots = self.layout.slots(rank)
        return min(slots) * self.slot_len, (max(slots) + 1) * self.slot_len - 1

    def visible(self, src) -> bool:
        """False when no local query sees any key of src's block (it is then not computed): all
        in the future, or (packed) all in documents that end before the local queries' first.
        Decided from the layout and the documents' host offsets: no device read."""
        (k_first, k_last), (q_first, q_last) = self.span(src), self.span(self.rank)
        if self.causal and k_first > q_last:
            return False
        if self.docs is None:
            return True
        document = self.docs.document_of
        return document(k_last) >= document(q_first) and document(k_first) <= document(q_last)

    def unpack(self, flat):
        out, offset = [], 0
        for shape in self.shapes:
            n = torch.Size(shape).numel()
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return out


class _SoftmaxBlocks(_Blocks):
    softmax = True

    def block(self, q_side, kv, src):
        (q,) = q_side
        k, v = self.unpack(kv)
        k_pos = self.positions(src)
        return attention_block(q, k, v, self.q_pos, k_pos, causal=self.causal, scale=self.scale, q_doc=self.q_doc,
                               k_doc=self.documents(k_pos))


class _LinearBlocks(_Blocks):
    softmax = False
    kind = DECAY_NONE

    def cumulative(self, g, offsets, rank):
        """Global cumulative log decay (fp64) of a shard's tokens: its slots' start offsets plus
        the cumulative sums inside each slot."""
        b, c, h = g.shape
        S = self.layout.slots_per_rank
        inside = torch.cumsum(g.to(torch.float64).view(b, S, c // S, h), dim=2)
        starts = torch.stack([offsets[s] for s in self.layout.slots(rank)], dim=1)  # [B, S, H]
        return (inside + starts.unsqueeze(2)).view(b, c, h)

    def block(self, q_side, kv, src):
        q, g_local, g_head, offsets = q_side
        k, v, *g_block = self.unpack(kv)
        k_pos = self.positions(src)
        Gq = Gk = None
        if g_head is not None:
            Gq, Gk = head_decay_cumulative(g_head, self.q_pos), head_decay_cumulative(g_head, k_pos)
        elif g_local is not None:
            Gq, Gk = self.cumulative(g_local, offsets, self.rank), self.cumulative(g_block[0], offsets, src)
        return (left_product_linear_attn(q, k, v, self.q_pos, k_pos, causal=self.causal, scale=self.scale, Gq=Gq, Gk=Gk,
                                         q_doc=self.q_doc, k_doc=self.documents(k_pos)),)


@without_autocast
def ring_attn(q, k, v, *, causal=True, scale=None, group=None, layout="contiguous", validate=False, cu_seqlens=None):
    """Ring Attention (softmax) across the ranks of `group`; the signature of `allgather_attn`
    (packed documents: blocks that no local query's document reaches are not computed). The
    communication is `SOFTMAX_SPEC.plan` (the README's method table)."""
    call = check_softmax_call(SOFTMAX_SPEC, q, k, v, scale=scale, causal=causal, group=group, validate=validate,
                              layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return softmax_attn(q, k, v, causal=causal, scale=call.scale, cu_seqlens=call.documents)
    slot_len = call.shape.seq_len // call.layout.slots_per_rank
    blocks = _SoftmaxBlocks(call.layout, call.rank, slot_len, (k.shape, v.shape), causal, call.scale, q.device,
                            call.packed)
    kv = torch.cat([k.reshape(-1), v.reshape(-1)])  # travels in the input dtype
    return _Ring.apply(blocks, group, kv, q).to(q.dtype)


def _slot_offsets(log_decay, group, layout):
    """[n_slots, B, H] fp64 cumulative log decay before each slot (one small all-gather)."""
    b, c, h = log_decay.shape
    S = layout.slots_per_rank
    totals = log_decay.to(torch.float64).view(b, S, c // S, h).sum(dim=2).transpose(0, 1)  # [S, B, H]
    rows = gather_rows(totals, group).view(layout.world, S, b, h)
    return exclusive_cumsum(slots_in_order(rows, layout), dim=0)


@without_autocast
def ring_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                     validate=False, layout="contiguous", cu_seqlens=None):
    """Ring Attention applied to linear attention without the right-product trick (the paper's
    baseline); the signature of `lasp2_linear_attn` (chunk_size is used only on one device).
    Supports log_decay None, [H] and [B, C, H]. The communication is `SPEC.plan`."""
    call = check_linear_call(SPEC, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                             chunk_size=chunk_size, validate=validate, layout=layout, cu_seqlens=cu_seqlens)
    if call.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size,
                                 cu_seqlens=call.documents)[0]
    kind, lay = call.shape.decay, call.layout
    travelling = [k, v] + ([log_decay] if kind == DECAY_TOKEN else [])
    blocks = _LinearBlocks(lay, call.rank, q.shape[1] // lay.slots_per_rank, [t.shape for t in travelling],
                           causal, call.scale, q.device, call.packed)
    g_local = log_decay if kind == DECAY_TOKEN else None
    g_head = log_decay if kind == DECAY_HEAD else None
    offsets = _slot_offsets(log_decay, group, lay) if kind == DECAY_TOKEN else None
    kv = torch.cat([t.reshape(-1).to(wire_dtype(q, log_decay)) for t in travelling])  # the input dtype
    return _Ring.apply(blocks, group, kv, q, g_local, g_head, offsets).to(q.dtype)


_BLOCK = "B·C·Hkv·(D + Dv)"
SOFTMAX_SPEC = MethodSpec(
    name="ring", family=SOFTMAX, fn=ring_attn, quadratic=True, compute="softmax_block",
    plan=Plan(forward=(Comm("send", _BLOCK, "W−1", precision="input"),),
              backward=(Comm("send", _BLOCK, "W−1", precision="input"), Comm("send", _BLOCK, "W")),
              steps="3·W−2", overlap="each block's compute"),
    notes="blocks merged with log-sum-exp in fp32; blocks entirely in the future are skipped; the gradient of a "
          "block travels in fp32",
)
_LINEAR_BLOCK = "B·C·H·(K + V + Gt)"
SPEC = MethodSpec(
    name="ring", family=LINEAR, fn=ring_linear_attn, quadratic=True, compute="left_product", decays=(DECAY_NONE, DECAY_HEAD, DECAY_TOKEN),
    decay_reason="per-channel gates cannot be written as the masked (Q K^T) V it computes",
    plan=Plan(forward=(Comm("all_gather", "S·B·H", precision="fp64", when=(DECAY_TOKEN,)),
                       Comm("send", _LINEAR_BLOCK, "W−1", precision="promoted")),
              backward=(Comm("send", _LINEAR_BLOCK, "W−1", precision="promoted"), Comm("send", _LINEAR_BLOCK, "W"),
                        Comm("reduce_scatter", "W·S·B·H", precision="fp64", when=(DECAY_TOKEN,))),
              steps="3·W−2", overlap="each block's compute"),
    notes="masked (Q K^T) V per block, without the right-product trick; the gradient of a block travels in fp32; "
          "the per-token decay's reduce-scatter runs when the decay requires grad",
)
