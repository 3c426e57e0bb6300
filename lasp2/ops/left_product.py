"""Linear attention as the masked left product (Q K^T) V: what Ring Attention and Megatron-style
all-gather compute when they are applied to linear attention without the right-product trick.

    o_i = scale * sum_{j visible from i} (q_i . k_j) exp(Gq_i - Gk_j) v_j

Gq, Gk are global cumulative log decays (sum of g over tokens 1..i), kept in fp64 so that the
difference Gq_i - Gk_j is exact to fp32 precision even across long sequences; only scalar
decays (per head, or per head and token) can be written this way. Quadratic in length:
[B, H, C, Cb] scores per call. Ordinary autograd ops.
"""
from __future__ import annotations

import torch

from .checks import compute_dtype
from .softmax_attn import visibility
from .tiling import over_query_tiles


def head_decay_cumulative(log_decay_H: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[H] per-head log decay -> [1, C, H] fp64 cumulative log decay (pos + 1) * g at pos."""
    return (pos.to(torch.float64) + 1).view(1, -1, 1) * log_decay_H.to(torch.float64).view(1, 1, -1)


def left_product_linear_attn(q, k, v, q_pos, k_pos, *, causal: bool, scale: float, Gq=None, Gk=None, q_doc=None,
                             k_doc=None):
    """One block of keys, in query tiles of bounded memory (see `tiling`).

    Args:
        q: [B, C, H, K]; k: [B, Cb, H, K]; v: [B, Cb, H, V].
        q_pos: [C], k_pos: [Cb] global positions; key j is visible from query i when
            pos_k[j] <= pos_q[i] (causal) or always.
        Gq: [B or 1, C, H], Gk: [B or 1, Cb, H] fp64 cumulative log decays, or both None.
        q_doc: [C], k_doc: [Cb] the document of each token (packed documents), or both None.
    Returns:
        o [B, C, H, V] in the compute dtype (fp32; fp64 for fp64).
    """
    def block(q, q_pos, Gq, q_doc, k, v, k_pos, Gk, k_doc):
        return _left_product(q, k, v, q_pos, k_pos, causal, scale, Gq, Gk, q_doc, k_doc)

    return over_query_tiles(block, (q, q_pos, Gq, q_doc), (k, v, k_pos, Gk, k_doc), k.shape[1],
                            q.shape[0] * q.shape[2])


def _left_product(q, k, v, q_pos, k_pos, causal, scale, Gq, Gk, q_doc, k_doc):
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, *, D]
    scores = qh @ kh.transpose(-1, -2)  # [B, H, C, Cb]
    visible = visibility(q_pos, k_pos, causal, q_doc, k_doc)
    if Gq is not None:
        diff = Gq.transpose(1, 2).unsqueeze(-1) - Gk.transpose(1, 2).unsqueeze(-2)  # [B, H, C, Cb] fp64
        scores = scores * torch.exp(diff.clamp(max=0.0)).to(dtype)  # hidden pairs clamp, then mask
    if visible is not None:
        scores = scores.masked_fill(~visible, 0.0)
    return (scores @ vh).transpose(1, 2) * scale
