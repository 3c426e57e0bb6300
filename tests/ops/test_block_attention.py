"""Softmax attention blocks, their merge, the left-product linear attention and query tiling,
against references written out in fp64."""
import dataclasses
import math

import pytest
import torch

from lasp2.ops import chunk_linear_attn, policy
from lasp2.ops.policy import CPU
from lasp2.ops.left_product import head_decay_cumulative, left_product_linear_attn
from lasp2.ops.softmax_attn import attention_block, merge_blocks, softmax_attn
from tests.helpers import make_inputs, rel_err


def reference_attention(q, k, v, causal, scale):
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if causal:
        T = q.shape[1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), vv), torch.logsumexp(scores, dim=-1).transpose(1, 2)


def _qkv(hq=4, hkv=2, T=37, dtype=torch.float64):
    gen = torch.Generator().manual_seed(hq + hkv)
    return (torch.randn(2, T, hq, 8, generator=gen, dtype=dtype), torch.randn(2, T, hkv, 8, generator=gen, dtype=dtype),
            torch.randn(2, T, hkv, 6, generator=gen, dtype=dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_blocks_merge_to_full_attention(causal, heads):
    q, k, v = _qkv(*heads)
    pos = torch.arange(37)
    o_ref, lse_ref = reference_attention(q, k, v, causal, 0.3)
    o, lse = attention_block(q, k, v, pos, pos, causal=causal, scale=0.3)
    assert rel_err(o, o_ref) < 1e-13 and rel_err(lse, lse_ref) < 1e-13
    # three key blocks in a scrambled order; the first query rows see nothing of the later blocks
    parts = [(20, 37), (0, 9), (9, 20)]
    acc = None
    for a, b in parts:
        part = attention_block(q, k[:, a:b], v[:, a:b], pos, pos[a:b], causal=causal, scale=0.3)
        acc = part if acc is None else merge_blocks(*acc, *part)
    assert rel_err(acc[0], o_ref) < 1e-13 and rel_err(acc[1], lse_ref) < 1e-13


def test_block_without_visible_keys_is_empty_and_has_finite_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(T=8))
    o, lse = attention_block(q, k, v, torch.arange(8), torch.arange(8) + 100, causal=True, scale=0.3)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    (o.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_path_matches_reference(causal):
    q, k, v = _qkv()
    assert rel_err(softmax_attn(q, k, v, causal=causal, scale=0.3), reference_attention(q, k, v, causal, 0.3)[0]) < 1e-13


@pytest.mark.parametrize("kind", ["none", "head", "token"])
@pytest.mark.parametrize("strong", [False, True])
def test_left_product_equals_chunked_linear_attention(kind, strong):
    x = make_inputs(kind, T=60, strong=strong)
    q, k, v, g = (None if t is None else t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"], x["g"]))
    pos = torch.arange(60)
    Gq = Gk = None
    if kind == "head":
        Gq = Gk = head_decay_cumulative(g, pos)
    elif kind == "token":
        Gq = Gk = torch.cumsum(g, dim=1)
    o = left_product_linear_attn(q, k, v, pos, pos, causal=True, scale=0.7, Gq=Gq, Gk=Gk)
    ref, _ = chunk_linear_attn(*(t.detach().requires_grad_() for t in (x["q"], x["k"], x["v"])),
                               None if g is None else g.detach().requires_grad_(), scale=0.7)
    assert rel_err(o, ref) < 1e-12
    assert torch.isfinite(o).all()


def test_query_tiling_changes_nothing():
    q, k, v = (t.requires_grad_() for t in _qkv())
    pos = torch.arange(37)

    def run():
        o, lse = attention_block(q, k, v, pos, pos, causal=True, scale=0.3)
        o2 = left_product_linear_attn(q[:, :, :2], k, v, pos, pos, causal=True, scale=0.5)
        loss = (o * o).sum() + lse.sum() + o2.square().sum()
        return [o, lse, o2, *torch.autograd.grad(loss, (q, k, v))]

    whole = run()
    with policy(dataclasses.replace(CPU, tile_scores=5 * 37 * 8)):  # tiles of 5 queries
        tiled = run()
    for a, b in zip(whole, tiled):
        assert rel_err(b, a) < 1e-13


def test_bottom_right_sdpa_in_query_blocks_equals_one_mask():
    """A query block shorter than its keys (the last 24 of 64 positions), as the all-gather method
    runs each slot: split into blocks of 5 queries, each against the keys up to its own end."""
    from lasp2.ops.softmax_attn import causal_mask, sdpa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64) for n, h in ((24, 4), (64, 2), (64, 2)))
    mask = causal_mask(torch.arange(40, 64), torch.arange(64))
    want = sdpa(q, k, v, scale=0.3, mask=mask)
    with policy(dataclasses.replace(CPU, tile_scores=5 * 64)):
        got = sdpa(q, k, v, scale=0.3, causal=True)
    assert rel_err(got, want) < 1e-14
