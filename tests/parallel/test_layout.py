"""Layouts: which tokens each rank holds, written out by hand, and unshard(shard(x)) == x."""
import pytest
import torch

from lasp2.parallel import SequenceParallel
from lasp2.parallel.layout import Layout
from tests.parallel.cases import layout_roundtrip


def expected_tokens(layout, rank, world, T):
    if layout == "contiguous":
        C = T // world
        return list(range(rank * C, (rank + 1) * C))
    c = T // (2 * world)  # zigzag: chunks r and 2W-1-r of 2W
    return list(range(rank * c, (rank + 1) * c)) + list(range((2 * world - 1 - rank) * c, (2 * world - rank) * c))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_positions_unshard(dist_workers, world, layout):
    T = 48
    x = torch.arange(2 * T * 3, dtype=torch.float64).view(2, T, 3)
    results = dist_workers.run(layout_roundtrip, tuple(range(world)), x, layout)
    for rank, got in results.items():
        tokens = expected_tokens(layout, rank, world, T)
        assert got["positions"].tolist() == tokens
        assert torch.equal(got["shard"], x[:, tokens])
        assert torch.equal(got["roundtrip"], x)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_balances_causal_work(world):
    """Each rank's causal attention work (the keys its queries see, at the positions the library
    gives it) is equal under zigzag; contiguous leaves the last rank with most of it."""
    T = 24 * world

    def work(layout):
        lay = Layout(layout, world)
        return [int((lay.local_positions(r, T // lay.n_slots) + 1).sum()) for r in range(world)]

    assert len(set(work("zigzag"))) == 1
    contiguous = work("contiguous")
    assert contiguous == sorted(contiguous) and contiguous[-1] > 1.4 * sum(contiguous) / world  # ~(2 - 1/W)x the mean


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"linear='lasp3' \(valid: lasp2, lasp1, allscan, logscan, ring, allgather, ulysses, auto\)"):
        SequenceParallel(None, linear="lasp3")
    with pytest.raises(ValueError, match=r"softmax='flash' \(valid: allgather, ring, ulysses\)"):
        SequenceParallel(None, softmax="flash")
    with pytest.raises(ValueError, match=r"layout='striped' \(valid: contiguous, zigzag, or a slot table"):
        SequenceParallel(None, layout="striped")


def test_single_device_context_runs_the_local_ops():
    sp = SequenceParallel(None, linear="ring", softmax="ring", layout="zigzag")
    q = torch.randn(1, 10, 2, 4)
    assert sp.shard(q) is not None and torch.equal(sp.shard(q), q)
    assert sp.positions(10).tolist() == list(range(10))
    assert sp.linear_attn(q, q, q).shape == (1, 10, 2, 4)
    assert sp.softmax_attn(q, q, q).shape == (1, 10, 2, 4)
