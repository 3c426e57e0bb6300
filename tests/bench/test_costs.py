"""The cost model's byte counts equal what the methods hand to torch.distributed (busiest rank,
fp32, no decay), and the α–β arithmetic behaves as documented."""
import pytest
import torch

from lasp2.bench import costs
from tests.helpers import make_inputs
from tests.parallel.cases import count_registered

B, T, H, K, V = 2, 48, 4, 6, 5
HQ, HKV = 4, 2


def busiest_bytes(results) -> int:
    return max(sum(b for _, b in got["forward"] + got["backward"]) for got in results.values())


LINEAR = [(m, w, lay) for m in ("lasp2", "lasp1", "ring", "allgather", "ulysses") for w in (2, 3, 4)
          for lay in ("contiguous", "zigzag") if not (m == "ulysses" and H % w)]


@pytest.mark.parametrize("method,world,layout", LINEAR)
def test_linear_formula_matches_counted_bytes(dist_workers, method, world, layout):
    inputs = make_inputs("none", B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(count_registered, tuple(range(world)), "linear", method, inputs, layout)
    layer = costs.Layer(B=B, N=T, W=world, H=H, K=K, V=V, slots=1 if layout == "contiguous" else 2)
    assert costs.bytes_per_rank("linear", method, layer) == busiest_bytes(results)


SOFTMAX = [(m, w, lay) for m in ("allgather", "ring", "ulysses") for w in (2, 3, 4)
           for lay in ("contiguous", "zigzag") if not (m == "ulysses" and HQ % w)]


@pytest.mark.parametrize("method,world,layout", SOFTMAX)
def test_softmax_formula_matches_counted_bytes(dist_workers, method, world, layout):
    gen = torch.Generator().manual_seed(0)
    inputs = {"q": torch.randn(B, T, HQ, K, generator=gen), "k": torch.randn(B, T, HKV, K, generator=gen),
              "v": torch.randn(B, T, HKV, V, generator=gen), "g": None}
    results = dist_workers.run(count_registered, tuple(range(world)), "softmax", method, inputs, layout)
    layer = costs.Layer(B=B, N=T, W=world, H=HQ, K=K, V=V, kv_heads=HKV, slots=1 if layout == "contiguous" else 2)
    assert costs.bytes_per_rank("softmax", method, layer) == busiest_bytes(results)


@pytest.mark.parametrize("world,slots,want", [(2, 1, (1, 0)), (3, 1, (1, 1)), (4, 1, (1, 1)), (2, 2, (1, 1)), (3, 2, (2, 2))])
def test_lasp1_sends_of_the_busiest_rank(world, slots, want):
    assert costs.lasp1_sends(world, slots) == want


def test_single_rank_sends_nothing():
    layer = costs.Layer(B=1, N=64, W=1, H=2, K=4, V=4)
    assert all(costs.bytes_per_rank(f, m, layer) == 0 for f, m in [("linear", "lasp2"), ("softmax", "ring")])


NET = costs.Network(alpha_intra=1e-5, beta_intra=1e11, alpha_inter=2e-5, beta_inter=1e10, ranks_per_node=8)


def test_collectives_cross_nodes_at_the_slow_link():
    gather = costs.Comm("all_gather", 10**6)
    assert NET.collective(gather, 8) == pytest.approx(7 * (1e-5 + 1e-5))
    assert NET.collective(gather, 16) == pytest.approx(15 * (2e-5 + 1e-4))
    hop = costs.Comm("p2p", 10**6)
    assert NET.chain(hop, 15) == pytest.approx(14 * (1e-5 + 1e-5) + 1 * (2e-5 + 1e-4))  # one of 15 hops leaves a node


def test_lasp2_hides_its_gather_behind_compute_and_lasp1_pays_its_chain():
    layer = costs.Layer(B=1, N=2**20, W=64, H=16, K=128, V=128)
    slow = 1e12  # FLOP/s: compute dominates
    lasp2, lasp1 = (costs.layer_time("linear", m, layer, NET, slow) for m in ("lasp2", "lasp1"))
    overlap, rest = costs.flops("linear", "lasp2", layer)
    assert lasp2["seconds"] == pytest.approx((overlap + rest) / slow)  # gather fully hidden
    assert lasp1["comm_s"] == pytest.approx(2 * NET.chain(costs.comm_plan("linear", "lasp1", layer)[0][0], 63))
    ring = costs.layer_time("linear", "ring", layer, NET, slow)
    assert ring["compute_s"] > 100 * lasp2["compute_s"]  # quadratic


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="no cost formula"):
        costs.comm_plan("linear", "nope", costs.Layer(B=1, N=8, W=2, H=1, K=1, V=1))
