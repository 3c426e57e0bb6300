"""Prefix/suffix state scans against a plain loop, including the two-level (grouped) path."""
import pytest
import torch

from lasp2.ops.scan import exclusive_cumsum, prefix_scan, reverse_cumsum, suffix_scan


@pytest.mark.parametrize("n", [1, 2, 16, 17, 37, 128, 131])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_scans_match_loop(n, decay):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, 4, 6, generator=gen, dtype=torch.float64)
    a = {"none": None, "scalar": torch.rand(2, 3, n, 1, generator=gen, dtype=torch.float64),
         "channel": torch.rand(2, 3, n, 4, generator=gen, dtype=torch.float64)}[decay]
    step = (lambda i: 1.0) if a is None else (lambda i: a[:, :, i, :, None])
    before, total = prefix_scan(x, a)
    s = torch.zeros(2, 3, 4, 6, dtype=torch.float64)
    for i in range(n):
        assert torch.allclose(before[:, :, i], s, rtol=1e-12, atol=1e-12)
        s = step(i) * s + x[:, :, i]
    assert torch.allclose(total, s, rtol=1e-12, atol=1e-12)
    after, total = suffix_scan(x, a)
    r = torch.zeros_like(s)
    for i in reversed(range(n)):
        assert torch.allclose(after[:, :, i], r, rtol=1e-12, atol=1e-12)
        r = x[:, :, i] + step(i) * r
    assert torch.allclose(total, r, rtol=1e-12, atol=1e-12)


def test_cumsums():
    x = torch.randn(3, 7, dtype=torch.float64)
    assert torch.allclose(exclusive_cumsum(x, 1), torch.cumsum(x, 1) - x)
    assert torch.allclose(reverse_cumsum(x, 1), x.flip(1).cumsum(1).flip(1))
