"""The cost model: α–β arithmetic as documented, each method's plan read from its spec, and the
predictions checked against figures worked out by hand. (That the specs' bytes equal what the
methods issue is tests/parallel/test_method_collectives.py.)"""
import pytest

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, Problem
from lasp2.parallel.spec import chain_sends
from lasp2.parallel import cost as costs

NET = costs.Network(alpha_intra=1e-5, beta_intra=1e11, alpha_inter=2e-5, beta_inter=1e10, ranks_per_node=8)


@pytest.mark.parametrize("world,slots,want", [(2, 1, (1, 0)), (3, 1, (1, 1)), (4, 1, (1, 1)), (2, 2, (1, 1)), (3, 2, (2, 2))])
def test_lasp1_sends_of_the_busiest_rank(world, slots, want):
    sends = chain_sends(world, slots)
    assert max(sends, key=sum) == want
    assert sum(f for f, _ in sends) == slots * world - 1 - (slots - 1)  # one hop per change of owner


def test_single_rank_sends_nothing():
    problem = Problem(B=1, N=64, W=1, H=2, K=4, V=4)
    assert LINEAR_METHODS["lasp2"].bytes_per_rank(problem) == 0 and SOFTMAX_METHODS["ring"].bytes_per_rank(problem) == 0
    assert costs.comm_seconds(LINEAR_METHODS["lasp1"], problem, NET) == 0


def test_collectives_cross_nodes_at_the_slow_link():
    assert NET.collective("all_gather", 10**6, 8) == pytest.approx(7 * (1e-5 + 1e-5))
    assert NET.collective("all_gather", 10**6, 16) == pytest.approx(15 * (2e-5 + 1e-4))
    assert NET.chain(10**6, 15) == pytest.approx(14 * (1e-5 + 1e-5) + 1 * (2e-5 + 1e-4))  # one of 15 hops leaves a node
    with pytest.raises(ValueError, match="no time model"):
        NET.collective("broadcast", 1, 2)


def test_lasp2_hides_its_gather_behind_compute_and_lasp1_pays_its_chain():
    problem = Problem(B=1, N=2**20, W=64, H=16, K=128, V=128)  # C = 16384 tokens per rank
    slow = 1e12  # FLOP/s: compute dominates
    lasp2 = costs.layer_time(LINEAR_METHODS["lasp2"], problem, NET, slow)
    # intra-chunk 3·B·H·C·2·64·(K+V) + state terms 3·B·H·C·4·K·V, the gather fully hidden
    assert lasp2["seconds"] == pytest.approx(3 * 16 * 16384 * (2 * 64 * 256 + 4 * 128 * 128) / slow)
    gather = 16 * 128 * 128 * 4  # B·H·K·V fp32 values, forward and backward, 63 steps at the inter-node link
    assert lasp2["comm_s"] == pytest.approx(2 * 63 * (2e-5 + gather / 1e10))
    lasp1 = costs.layer_time(LINEAR_METHODS["lasp1"], problem, NET, slow)
    hop = gather  # the same state, hop by hop: 56 of the 63 stay inside a node
    assert lasp1["comm_s"] == pytest.approx(2 * (56 * (1e-5 + hop / 1e11) + 7 * (2e-5 + hop / 1e10)))
    # a chain's hops follow each rank's own compute: not hidden
    assert lasp1["seconds"] == pytest.approx(lasp1["compute_s"] + lasp1["comm_s"])
    ring = costs.layer_time(LINEAR_METHODS["ring"], problem, NET, slow)
    assert ring["compute_s"] == pytest.approx(3.5 * 16 * 16384 * 2**20 * 2 * 256 / slow)  # quadratic


def test_methods_without_overlap_wait_for_their_communication():
    problem = Problem(B=1, N=8192, W=4, H=8, K=64, V=64)
    ulysses = costs.layer_time(LINEAR_METHODS["ulysses"], problem, NET, 1e9)
    assert ulysses["seconds"] == pytest.approx(ulysses["compute_s"] + ulysses["comm_s"])
    into, out = 2048 * 8 * (2 * 64 + 64) * 4, 2048 * 8 * 64 * 4  # B·C·H·(2K+V), B·C·H·V fp32
    assert ulysses["comm_s"] == pytest.approx(2 * sum(1e-5 + n * 3 / 4 / 1e11 for n in (into, out)))


def test_a_kernel_rate_for_every_registered_method():
    for spec in [*LINEAR_METHODS.values(), *SOFTMAX_METHODS.values()]:
        assert costs.kernel(spec) in {"chunk", "left_product", "softmax_block", "sdpa_masked", "sdpa_causal"}


def test_delta_rule_flops_and_what_lasp2_overlaps():
    """B=1, H=2, C=128, K=V=64, by hand: query side 3·256·2·64·192 = 18,874,368; the rest
    3·256·(24,576 + 8192/3 + 24,576) = 39,845,888. LASP-2 overlaps the query side; LASP-1 and
    Ulysses overlap nothing."""
    x = Problem(B=1, N=256, W=2, S=1, H=2, K=64, V=64, Hkv=2, decay="token")
    assert costs.flops(DELTA_METHODS["lasp2"], x) == pytest.approx((18_874_368, 39_845_888))
    for name in ("lasp1", "ulysses"):
        assert costs.flops(DELTA_METHODS[name], x) == pytest.approx((0.0, 18_874_368 + 39_845_888))


def test_allscan_pays_its_pipeline_and_logscan_its_rounds():
    """W = 64, B = 1, H = 16, K = 128, V = 128 (allscan: P = 8 blocks of 16 columns), by hand."""
    problem = Problem(B=1, N=2**20, W=64, H=16, K=128, V=128, decay="token")
    state, piece = 16 * 128 * 128 * 4, 16 * 128 * 16 * 4
    allscan = costs.comm_seconds(LINEAR_METHODS["allscan"], problem, NET)
    hops = 63 + 8 - 1  # the last of 8 pieces leaves 7 piece hops after the first; 8 of the 70 cross a node
    assert allscan == pytest.approx(2 * (62 * (1e-5 + piece / 1e11) + 8 * (2e-5 + piece / 1e10)))
    assert hops == 70
    logscan = costs.comm_seconds(LINEAR_METHODS["logscan"], problem, NET)
    window = state + 16 * 4  # the state and one decay per head
    assert logscan == pytest.approx(2 * 6 * (2e-5 + window / 1e10))  # 6 rounds, at the inter-node link
    zigzag = costs.comm_seconds(LINEAR_METHODS["logscan"], Problem(**{**problem.__dict__, "S": 2}), NET)
    assert zigzag == pytest.approx(2 * 7 * (2e-5 + 2 * window / 1e10))  # 128 slots: 7 rounds of two windows


def test_choose_exchange_follows_the_network():
    """Latency-bound links favour logscan's ⌈log2 W⌉ rounds at large W (and at W = 2 every exchange
    is one step a pass: the tie goes to LASP-2); bandwidth-bound ones with a dense transition
    favour allscan's one state a hop over logscan's state plus transition a round."""
    latency = costs.Network(1e-4, 1e15, 1e-4, 1e15, ranks_per_node=1 << 20)
    bandwidth = costs.Network(0.0, 1e9, 0.0, 1e9, ranks_per_node=1 << 20)
    linear = Problem(B=1, N=64 * 1024, W=64, H=16, K=128, V=128, decay="token")
    assert costs.choose_exchange(LINEAR_METHODS, linear, latency)[0] == "logscan"
    pair = Problem(B=1, N=2048, W=2, H=16, K=128, V=128, decay="token")
    best, seconds = costs.choose_exchange(LINEAR_METHODS, pair, latency)
    assert best == "lasp2" and seconds["lasp2"] == pytest.approx(seconds["logscan"])
    assert set(seconds) == {"lasp2", "lasp1", "allscan", "logscan"}
    dense = Problem(B=1, N=64 * 1024, W=64, H=16, Hkv=16, K=128, V=128, decay="channel")
    best, seconds = costs.choose_exchange(DELTA_METHODS, dense, bandwidth)
    assert best == "allscan" and seconds["allscan"] < seconds["logscan"] < seconds["lasp2"]
