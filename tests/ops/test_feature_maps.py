import math

import torch

from lasp2.ops import (
    elu_plus_one_feature_map,
    identity_feature_map,
    rebased_feature_map,
    relu_feature_map,
    silu_feature_map,
    taylor_feature_map,
)


def test_simple_maps():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    assert torch.equal(identity_feature_map(x), x)
    assert torch.allclose(elu_plus_one_feature_map(x), torch.where(x > 0, x + 1, torch.exp(x)))
    assert (elu_plus_one_feature_map(x) > 0).all()
    assert torch.equal(relu_feature_map(x), x.clamp_min(0))
    assert torch.allclose(silu_feature_map(x), x / (1 + torch.exp(-x)))


def test_taylor_map_is_second_order_exp_kernel():
    d = 16
    q, k = torch.randn(2, 7, 3, d, dtype=torch.float64), torch.randn(2, 7, 3, d, dtype=torch.float64)
    for scale in (None, 0.3):
        s = 1 / math.sqrt(d) if scale is None else scale
        fq, fk = taylor_feature_map(q, scale), taylor_feature_map(k, scale)
        assert fq.shape == (2, 7, 3, 1 + d + d * d)
        dot = (q * k).sum(-1)
        expected = 1 + s * dot + (s * dot) ** 2 / 2
        assert torch.allclose((fq * fk).sum(-1), expected, rtol=1e-12, atol=1e-12)


def test_rebased_map():
    d = 8
    x = torch.randn(4, 6, d, dtype=torch.float64)
    w, b = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (w * (x - mean) / torch.sqrt(var + 1e-5) + b) ** 2
    out = rebased_feature_map(x, w, b)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert (out >= 0).all()
    w.requires_grad_(True)
    rebased_feature_map(x, w, b).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
