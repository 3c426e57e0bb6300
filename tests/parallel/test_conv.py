"""The short causal convolution across ranks equals torch's conv1d over the whole sequence:
every rank's outputs and the gradients of x, weight and bias, W in {1, 2, 3, 4}, both layouts."""
import pytest
import torch
import torch.nn.functional as F

from lasp2.ops.conv import causal_conv1d as local_causal_conv1d
from tests.helpers import leaf, rel_err

T, B, D = 24, 2, 5


def reference(x, weight, bias, do):
    """torch.nn.functional.conv1d, depthwise, w-1 zeros on the left, then SiLU."""
    x, weight, bias = leaf(x), leaf(weight), leaf(bias)
    w = weight.shape[1]
    out = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), bias, groups=D).transpose(1, 2))
    out.backward(do)
    return {"o": out.detach(), "dx": x.grad, "dweight": weight.grad, "dbias": bias.grad}


def conv_shard(group, x, weight, bias, do, layout, cu_seqlens=None):
    from lasp2.parallel import causal_conv1d, positions, shard

    xl, weight, bias = leaf(shard(x, group, layout)), leaf(weight), leaf(bias)
    out = causal_conv1d(xl, weight, bias, group=group, layout=layout, cu_seqlens=cu_seqlens)
    out.backward(shard(do, group, layout))
    return {"o": out.detach(), "dx": xl.grad, "dweight": weight.grad, "dbias": bias.grad,
            "positions": positions(x.shape[1], group, layout)}


def _inputs(w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((B, T, D), (D, w), (D,), (B, T, D))]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_conv_across_ranks_equals_one_device(dist_workers, world, w, layout):
    x, weight, bias, do = _inputs(w)
    ref = reference(x, weight, bias, do)
    results = dist_workers.run(conv_shard, tuple(range(world)), x, weight, bias, do, layout)
    for rank, got in results.items():
        pos = got["positions"]
        assert rel_err(got["o"], ref["o"][:, pos]) < 1e-12, rank
        assert rel_err(got["dx"], ref["dx"][:, pos]) < 1e-12, rank
    for name in ("dweight", "dbias"):  # replicated parameters: the ranks' parts sum to the whole
        assert rel_err(sum(got[name] for got in results.values()), ref[name]) < 1e-12, name


def test_single_device_halo_continues_a_sequence():
    x, weight, bias, _ = _inputs(4)
    whole = local_causal_conv1d(x, weight, bias)
    second = local_causal_conv1d(x[:, 10:], weight, bias, halo=x[:, 7:10])
    assert rel_err(second, whole[:, 10:]) < 1e-14


@pytest.mark.parametrize("length, world, layout", [(16, 4, "zigzag"), (8, 4, "zigzag"), (6, 3, "contiguous")])
def test_slots_shorter_than_the_halo_read_several_tails(dist_workers, length, world, layout):
    """Slots of 2 or 1 tokens with w − 1 = 3: a halo spans two or three earlier slots (and zeros)."""
    x, weight, bias, do = (t[:, :length] if t.dim() == 3 else t for t in _inputs(4))
    ref = reference(x, weight, bias, do)
    results = dist_workers.run(conv_shard, tuple(range(world)), x, weight, bias, do, layout)
    for rank, got in results.items():
        assert rel_err(got["o"], ref["o"][:, got["positions"]]) < 1e-12, rank
        assert rel_err(got["dx"], ref["dx"][:, got["positions"]]) < 1e-12, rank
    for name in ("dweight", "dbias"):
        assert rel_err(sum(got[name] for got in results.values()), ref[name]) < 1e-12, name


def conv_collectives(group, x, weight, layout):
    from lasp2.parallel import SequenceParallel, count_collectives

    sp = SequenceParallel(group, layout=layout)
    xl = leaf(sp.shard(x))
    with count_collectives() as forward:
        out = sp.causal_conv1d(xl, weight)
    with count_collectives() as backward:
        out.sum().backward()
    return forward.rows(), backward.rows()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_one_all_gather_of_the_tails_forward_one_reduce_scatter_backward(dist_workers, layout):
    x, weight, _, _ = _inputs(4)
    S, world = (1 if layout == "contiguous" else 2), 3
    tails = S * B * 3 * D * 8  # S slots x B x (w-1) tokens x D channels, fp64
    for forward, backward in dist_workers.run(conv_collectives, (0, 1, 2), x, weight, layout).values():
        assert forward == [("all_gather", tails)] and backward == [("reduce_scatter", world * tails)]


# Packed documents: boundaries inside the halo of slot edges (6, 8, 12 for the layouts above)
DOCUMENTS = [0, 1, 5, 7, 12, 13, 20, 24]


def documents_alone(x, weight, bias, do, cu):
    """Each document through torch's conv1d on its own (zeros before it), joined."""
    x, weight, bias = leaf(x), leaf(weight), leaf(bias)
    w = weight.shape[1]
    parts = [F.conv1d(F.pad(x[:, a:b].transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), bias, groups=D)
             for a, b in zip(cu, cu[1:])]
    out = F.silu(torch.cat(parts, dim=2).transpose(1, 2))
    out.backward(do)
    return {"o": out.detach(), "dx": x.grad, "dweight": weight.grad, "dbias": bias.grad}


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_conv_does_not_leak_across_documents(dist_workers, world, w, layout):
    x, weight, bias, do = (t[:1] if t.dim() == 3 else t for t in _inputs(w, seed=1))
    ref = documents_alone(x, weight, bias, do, DOCUMENTS)
    cu = torch.tensor(DOCUMENTS)
    single = conv_shard(None, x, weight, bias, do, layout, cu)
    for name in ("o", "dx", "dweight", "dbias"):
        assert rel_err(single[name], ref[name]) < 1e-12, name
    results = dist_workers.run(conv_shard, tuple(range(world)), x, weight, bias, do, layout, cu)
    for rank, got in results.items():
        pos = got["positions"]
        assert rel_err(got["o"], ref["o"][:, pos]) < 1e-12, rank
        assert rel_err(got["dx"], ref["dx"][:, pos]) < 1e-12, rank
    for name in ("dweight", "dbias"):
        assert rel_err(sum(got[name] for got in results.values()), ref[name]) < 1e-12, name
