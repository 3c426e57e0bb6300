"""Softmax attention pieces: a block of keys at a time (with its log-sum-exp), and the whole.

Masks are given by global token positions, so any sharding layout gets the right causal
offsets: query i sees key j when pos_k[j] <= pos_q[i] (causal) or always (bidirectional).
GQA/MQA: q has Hq heads, k and v have Hkv heads, Hq % Hkv == 0, query head h uses KV head
h // (Hq / Hkv). Shapes [B, T, H, D]. Everything here is ordinary autograd ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from .checks import compute_dtype
from .documents import documents
from .policy import policy_for
from .precision import without_autocast
from .tiling import over_query_tiles


def _grouped_heads(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, C, Hq, D] -> [B, Hkv, G, C, D] with G = Hq / Hkv query heads per KV head."""
    b, c, hq, d = q.shape
    return q.reshape(b, c, kv_heads, hq // kv_heads, d).permute(0, 2, 3, 1, 4)


def attention_block(q, k, v, q_pos, k_pos, *, causal: bool, scale: float, q_doc=None, k_doc=None):
    """Attention of the queries to one block of keys.

    Args:
        q: [B, C, Hq, D]; k: [B, Cb, Hkv, D]; v: [B, Cb, Hkv, Dv].
        q_pos: [C], k_pos: [Cb] global positions (int).
        q_doc: [C], k_doc: [Cb] the document of each token (packed documents: a query sees only
            keys of its own document), or both None.
    Returns:
        (o [B, C, Hq, Dv], lse [B, C, Hq]) in the compute dtype (fp32; fp64 for fp64): the
        softmax-weighted values over this block and the log-sum-exp of the scaled scores. A row
        that sees no key of the block gets o = 0 and lse = -inf. Computed in query tiles of
        bounded memory (see `tiling`).
    """

    def block(q, q_pos, q_doc, k, v, k_pos, k_doc):
        return _attention_block(q, k, v, q_pos, k_pos, causal, scale, q_doc, k_doc)

    return over_query_tiles(block, (q, q_pos, q_doc), (k, v, k_pos, k_doc), k.shape[1], q.shape[0] * q.shape[2])


def _attention_block(q, k, v, q_pos, k_pos, causal, scale, q_doc, k_doc):
    dtype = compute_dtype(q.dtype)
    b, c, hq, _ = q.shape
    hkv = k.shape[2]
    qg = _grouped_heads(q.to(dtype), hkv)  # [B, Hkv, G, C, D]
    kh = k.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Cb, D]
    vh = v.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)
    scores = (qg @ kh.transpose(-1, -2)) * scale  # [B, Hkv, G, C, Cb]
    visible = visibility(q_pos, k_pos, causal, q_doc, k_doc)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    o = (weights @ vh) / safe_total
    lse = torch.where(seen, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    o = o.permute(0, 3, 1, 2, 4).reshape(b, c, hq, -1)
    return o, lse.squeeze(-1).permute(0, 3, 1, 2).reshape(b, c, hq)


def merge_blocks(o_a, lse_a, o_b, lse_b):
    """Combine two blocks' (o, lse) of the same queries into the attention over both, stably."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    return w_a * o_a + w_b * o_b, lse


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[C, Cb] bool, True where the query may attend to the key."""
    return k_pos.view(1, -1) <= q_pos.view(-1, 1)


def visibility(q_pos, k_pos, causal: bool, q_doc=None, k_doc=None) -> torch.Tensor | None:
    """[C, Cb] bool, True where query i may see key j: causally (k_pos <= q_pos) when causal, and
    within its own document when q_doc / k_doc are given; None when every pair is visible."""
    visible = causal_mask(q_pos, k_pos) if causal else None
    if q_doc is not None:
        same = q_doc.view(-1, 1) == k_doc.view(1, -1)
        visible = same if visible is None else visible & same
    return visible


def sdpa(q, k, v, *, scale: float, causal: bool = False, mask: torch.Tensor | None = None):
    """torch's scaled_dot_product_attention on [B, T, H, D] tensors, GQA included; computes in
    fp32 for half inputs on the CPU (fp64 stays fp64), returns q's dtype.

    causal: the Lq queries are the last Lq of the Lk key positions (bottom-right aligned; the
    usual causal mask when Lq == Lk). On CUDA a shorter query block goes to the fused kernels
    through torch's lower-right `CausalBias` (flash attention takes no explicit mask); the CPU
    kernels take the boolean mask, built per block of queries (each sees the keys up to its own
    end, so the mask stays within the policy's `tile_scores` per head and the keys after a block
    are not scored). mask: an explicit [Lq, Lk] bool mask (True: attend) instead of `causal`
    (packed documents).
    """
    q_len, k_len = q.shape[1], k.shape[1]
    if mask is None and causal and q_len != k_len and not q.is_cuda:
        tile = max(1, policy_for(q.device).tile_scores // k_len)
        if tile < q_len:
            return torch.cat([sdpa(q[:, a:a + tile], k[:, :k_len - q_len + min(a + tile, q_len)],
                                   v[:, :k_len - q_len + min(a + tile, q_len)], scale=scale, causal=True)
                              for a in range(0, q_len, tile)], dim=1)
    dtype = q.dtype if q.is_cuda else compute_dtype(q.dtype)
    qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if mask is None and causal and q_len != k_len:
        mask = _bottom_right(q_len, k_len, q.device)
    elif mask is not None:
        causal = False
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                       enable_gqa=gqa)
    return o.transpose(1, 2).to(q.dtype)


def _bottom_right(q_len: int, k_len: int, device: torch.device):
    if device.type != "cuda":
        return causal_mask(torch.arange(k_len - q_len, k_len, device=device), torch.arange(k_len, device=device))
    # CausalBias is a tensor subclass: built outside any active dispatch mode (a collective
    # counter, torch's CommDebugMode), under which a subclass cannot be created.
    with _disable_current_modes():
        return causal_lower_right(q_len, k_len)


@without_autocast
def softmax_attn(q, k, v, *, causal: bool = True, scale=None, cu_seqlens=None):
    """Single-device softmax attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, Dv].
    cu_seqlens: None, or [N + 1] int64 offsets of documents packed in one row (B = 1): each token
    attends within its own document only (`lasp2.ops.documents`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        return sdpa(q, k, v, scale=scale, causal=causal)
    T = q.shape[1]
    doc, pos = documents(cu_seqlens, "softmax_attn", T, q.shape[0]).ids(q.device), torch.arange(T, device=q.device)
    return sdpa(q, k, v, scale=scale, mask=visibility(pos, pos, causal, doc, doc))
