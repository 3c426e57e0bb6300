"""The short causal convolution across ranks: each slot takes the w−1 inputs before it in
sequence order as its halo (zeros before the sequence's first token).

One all-gather of every slot's last min(w−1, slot length) inputs forward (S·B·min(w−1, C/S)·D
values per rank), the reduce-scatter of their gradients backward; the layout's slot order
(zigzag included) decides which tails each slot reads. A slot shorter than w−1 tokens sends all
of them, and the slot after it reads the tails of as many slots as its halo spans.
"""
from __future__ import annotations

import torch

from ..ops.conv import causal_conv1d as local_causal_conv1d
from ..ops.conv import check_conv_inputs
from ..ops.documents import documents
from .collectives import gather_rows
from .comm import group_rank_size
from .layout import as_layout, slots_in_order


def last_inputs(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last w−1 inputs of x [B, T, D] -> [B, w−1, D], zeros before the first (the state a
    convolution of width w continues from)."""
    keep = x[:, max(0, x.shape[1] - (width - 1)):]
    return torch.cat([keep.new_zeros(x.shape[0], width - 1 - keep.shape[1], x.shape[2]), keep], dim=1)


def causal_conv1d(x, weight, bias=None, *, activation="silu", group=None, layout="contiguous", cu_seqlens=None,
                  output_final_state=False):
    """Depthwise causal convolution of this rank's shard x [B, C, D] as if over the whole
    sequence (see `lasp2.ops.conv.causal_conv1d`; weight [D, w], bias [D] or None). cu_seqlens:
    the global offsets of packed documents (B = 1, equal shards): no token reads an input of an
    earlier document, halo included. output_final_state: also return the last w−1 inputs of the
    whole sequence [B, w−1, D], the same on every rank (the convolution's state for decoding;
    taken from the tails every rank gathers anyway, no further communication)."""
    fn = "causal_conv1d"
    w = check_conv_inputs(fn, x, weight, bias, activation)
    rank, world = group_rank_size(group)
    if output_final_state and cu_seqlens is not None:
        raise ValueError(f"{fn}: output_final_state=True with cu_seqlens (packed documents) is not supported")
    if world == 1:
        out = local_causal_conv1d(x, weight, bias, activation=activation, cu_seqlens=cu_seqlens)
        return (out, last_inputs(x, w)) if output_final_state else out
    lay = as_layout(layout, world, "causal_conv1d")
    lay.check_local_length(x.shape[1], fn)
    doc_positions = None
    if cu_seqlens is not None:
        docs = documents(cu_seqlens, fn, x.shape[1] * world, x.shape[0])
        doc_positions = docs.memo(("conv positions", lay, rank, x.shape[1], str(x.device)), lambda: docs.positions(
            x.device)[lay.local_positions(rank, x.shape[1] // lay.slots_per_rank, x.device)])
    S = lay.slots_per_rank
    slot_len = x.shape[1] // S
    if w == 1:  # no halo to bring
        out = local_causal_conv1d(x, weight, bias, activation=activation)
        return (out, x[:, :0]) if output_final_state else out
    mine = [None] * S if doc_positions is None else doc_positions.view(S, slot_len).unbind(0)
    b, _, d = x.shape
    kept = min(w - 1, slot_len)  # the inputs of a slot that a later halo may read
    slots = x.view(b, S, slot_len, d)
    tails = slots[:, :, slot_len - kept:].transpose(0, 1)  # [S, B, kept, D]
    rows = gather_rows(tails.contiguous(), group).view(world, S, b, kept, d)  # one all-gather
    in_order = slots_in_order(rows, lay)  # [n_slots, B, kept, D]
    # Every slot's tail in sequence order after w-1 zeros: slot s's halo is the w-1 inputs that end
    # where its own tail starts. Taken from one tensor built from the gathered rows on every rank,
    # so that every rank's backward reaches the gather and issues its reduce-scatter (rank 0 of
    # the contiguous layout reads only zeros, yet must take part).
    seq = torch.cat([x.new_zeros(b, w - 1, d), in_order.transpose(0, 1).reshape(b, -1, d)], dim=1)
    outputs = [local_causal_conv1d(slots[:, index], weight, bias, activation=activation,
                                   halo=seq[:, slot * kept:slot * kept + w - 1], doc_positions=mine[index])
               for index, slot in enumerate(lay.slots(rank))]
    out = torch.cat(outputs, dim=1)
    return (out, seq[:, -(w - 1):]) if output_final_state else out
