"""Prefix/suffix state scans against a plain loop, for every transition kind (none, scalar,
per channel, dense K x K) under both device policies: the CPU's two-level (grouped) and
sequential paths, and the CUDA policy's log-depth tree, whose op count grows with log N."""
import pytest
import torch

from lasp2.ops import policy
from lasp2.ops.counting import count_dispatch
from lasp2.ops.scan import exclusive_cumsum, prefix_scan, reverse_cumsum, suffix_scan


def _transitions(decay, n, gen):
    if decay == "dense":  # spectral norm about 1, as the delta rule's maps
        a = torch.randn(2, 3, n, 4, 4, generator=gen, dtype=torch.float64)
        return a / torch.linalg.matrix_norm(a, ord=2, keepdim=True)
    return {"none": None, "scalar": torch.rand(2, 3, n, 1, generator=gen, dtype=torch.float64),
            "channel": torch.rand(2, 3, n, 4, generator=gen, dtype=torch.float64)}[decay]


@pytest.mark.parametrize("device_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 37, 128, 131])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel", "dense"])
def test_scans_match_loop(n, decay, device_policy):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, 4, 6, generator=gen, dtype=torch.float64)
    a = _transitions(decay, n, gen)
    dense = decay == "dense"
    if a is None:
        step = lambda i, s: s  # noqa: E731
    elif dense:
        step = lambda i, s: a[:, :, i] @ s  # noqa: E731
    else:
        step = lambda i, s: a[:, :, i, :, None] * s  # noqa: E731
    with policy(device_policy):
        before, total = prefix_scan(x, a, dense=dense)
        after, total_back = suffix_scan(x, a, dense=dense)
    s = torch.zeros(2, 3, 4, 6, dtype=torch.float64)
    for i in range(n):
        assert torch.allclose(before[:, :, i], s, rtol=1e-12, atol=1e-12)
        s = step(i, s) + x[:, :, i]
    assert torch.allclose(total, s, rtol=1e-12, atol=1e-12)
    r = torch.zeros_like(s)
    for i in reversed(range(n)):
        assert torch.allclose(after[:, :, i], r, rtol=1e-12, atol=1e-12)
        r = x[:, :, i] + step(i, r)
    assert torch.allclose(total_back, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decay", ["none", "scalar", "channel", "dense"])
def test_the_tree_scan_launches_grow_with_log_n(decay):
    """Under policy("cuda"): ops(8N) - ops(N) is at most 3 levels' worth (a level: ~14 ops for
    row scales, ~30 for dense maps, whose broadcast matmuls count their views), where the CPU's
    loops grow with N (or sqrt N)."""
    counts = {}
    for n in (16, 128, 1024):
        gen = torch.Generator().manual_seed(0)
        x, a = torch.randn(2, 3, n, 4, 6, generator=gen, dtype=torch.float64), _transitions(decay, n, gen)
        with policy("cuda"), count_dispatch() as log:
            prefix_scan(x, a, dense=decay == "dense")
        counts[n] = log.op_count()
    assert counts[128] - counts[16] <= 3 * 30 and counts[1024] - counts[128] <= 3 * 30, counts


def test_cumsums():
    x = torch.randn(3, 7, dtype=torch.float64)
    assert torch.allclose(exclusive_cumsum(x, 1), torch.cumsum(x, 1) - x)
    assert torch.allclose(reverse_cumsum(x, 1), x.flip(1).cumsum(1).flip(1))
