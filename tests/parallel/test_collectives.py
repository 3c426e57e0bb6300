"""The collectives each state-passing method issues per pass: kind, count, bytes, and what
overlaps them."""
import pytest
import torch

from tests.helpers import make_inputs
from tests.parallel.cases import count_passes, even_bounds, overlap_order, point_to_point_order

B, T, H, K, V = 2, 48, 3, 6, 5
STATE_BYTES = B * H * K * V * 4  # fp32
DECAY_BYTES = {"none": 0, "head": B * H * 4, "token": B * H * 4, "channel": B * H * K * 4}


def _counts(dist_workers, method, world, kind, causal=True, validate=False):
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    return dist_workers.run(count_passes, tuple(range(world)), method, inputs, even_bounds(T, world), causal, validate)


@pytest.mark.parametrize("kind", ["none", "head", "token", "channel", "bidirectional"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp2_one_all_gather_per_pass(dist_workers, world, kind):
    causal = kind != "bidirectional"
    kind = "none" if not causal else kind
    results = _counts(dist_workers, "lasp2", world, kind, causal)
    for rank in range(world):
        forward, backward = results[rank]["forward"], results[rank]["backward"]
        assert forward == [("all_gather", STATE_BYTES + DECAY_BYTES[kind])], (rank, forward)
        assert backward == [("all_gather", STATE_BYTES)], (rank, backward)


@pytest.mark.parametrize("kind", ["none", "token", "channel"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp1_relays_state_point_to_point(dist_workers, world, kind):
    results = _counts(dist_workers, "lasp1", world, kind)
    for rank in range(world):
        forward, backward = results[rank]["forward"], results[rank]["backward"]
        want_fwd = ([("recv", 0)] if rank > 0 else []) + ([("send", STATE_BYTES)] if rank < world - 1 else [])
        want_bwd = ([("recv", 0)] if rank < world - 1 else []) + ([("send", STATE_BYTES)] if rank > 0 else [])
        assert forward == want_fwd, (rank, forward)
        assert backward == want_bwd, (rank, backward)
    for which in ("forward", "backward"):
        sends = sum(name == "send" for r in range(world) for name, *_ in results[r][which])
        assert sends == world - 1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp1_bidirectional_sends_two_chains(dist_workers, world):
    results = _counts(dist_workers, "lasp1", world, "none", causal=False)
    for which in ("forward", "backward"):
        calls = [name for r in range(world) for name, *_ in results[r][which]]
        assert calls.count("send") == 2 * (world - 1) and calls.count("recv") == 2 * (world - 1)
        assert not any("gather" in name for name in calls)


@pytest.mark.parametrize("method", ["lasp2", "lasp1"])
def test_validate_adds_one_small_all_gather(dist_workers, method):
    plain = _counts(dist_workers, method, 2, "token")
    checked = _counts(dist_workers, method, 2, "token", validate=True)
    for rank in range(2):
        assert checked[rank]["forward"][0] == ("all_gather", 11 * 8)
        assert checked[rank]["forward"][1:] == plain[rank]["forward"]
        assert checked[rank]["backward"] == plain[rank]["backward"]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("kind", ["none", "channel"])
def test_lasp2_overlaps_gather_with_local_compute(dist_workers, kind, layout):
    """Forward: the intra-chunk output (two matmuls per chunk) runs while the states travel;
    backward: the recomputed states and the query-side gradients."""
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(overlap_order, (0, 1, 2), "lasp2", inputs, even_bounds(T, 3), layout)
    for rank in range(3):
        (fwd_kind, fwd_matmuls), = results[rank]["forward"]
        (bwd_kind, bwd_matmuls), = results[rank]["backward"]
        assert fwd_kind == bwd_kind == "_allgather_base_"
        assert fwd_matmuls >= 2 and bwd_matmuls >= 4, (rank, fwd_matmuls, bwd_matmuls)


@pytest.mark.parametrize("late_rank", [None, 0, 1])
def test_the_cuda_policy_overlaps_every_tile_whatever_the_timing(dist_workers, late_rank):
    """Under policy("cuda") the schedule is fixed: every tile's intra-chunk output (2 matmuls a
    tile without decay) and query-side gradients run while the gather is in flight, whether the
    states arrive at once or a peer starts late; so the kernel sequence is the same every step
    (NCCL's is_completed() cannot be trusted to say when the states are there)."""
    inputs = make_inputs("none", B=1, T=384, H=2, K=8, V=8, dtype=torch.float32)
    tile = 2 * 64 * 64  # one 64-token chunk of 2 heads: 3 tiles a rank
    results = dist_workers.run(overlap_order, (0, 1), "lasp2", inputs, even_bounds(384, 2), "contiguous", "cuda",
                               tile, late_rank)
    for rank in range(2):
        (_, fwd_matmuls), = results[rank]["forward"]
        (_, bwd_matmuls), = results[rank]["backward"]
        assert fwd_matmuls == 2 * 3, (rank, fwd_matmuls)
        assert bwd_matmuls == 6 * 3, (rank, bwd_matmuls)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("method", ["lasp1", "allscan"])
def test_chains_pair_their_sends_and_receives_in_one_order(dist_workers, method, world, layout, causal):
    """Between any two ranks, the i-th point-to-point op one issues to the other is a send
    exactly when the other's i-th is a receive: NCCL runs a pair's operations in issue order
    (tags do not reorder them), so two receives issued first would wait for each other.
    (logscan's rounds go out as one batch each, which NCCL groups.)"""
    kind = "token" if causal else "none"
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(point_to_point_order, tuple(range(world)), method, inputs, layout, causal)
    for which in ("forward", "backward"):
        for a in range(world):
            for b in range(a + 1, world):
                a_to_b = [k for k, peer, _ in results[a][which] if peer == b]
                b_to_a = [k for k, peer, _ in results[b][which] if peer == a]
                assert len(a_to_b) == len(b_to_a) and all(x != y for x, y in zip(a_to_b, b_to_a)), (which, a, b)


@pytest.mark.parametrize("kind", ["none", "token"])
def test_lasp1_first_hop_leaves_before_the_local_compute(dist_workers, kind):
    """The chain's first hop needs no remote state: rank 0 sends it (and the last rank the
    backward's) before its intra-chunk matmuls, which then overlap it."""
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(point_to_point_order, (0, 1, 2), "lasp1", inputs, "contiguous")
    (first, peer, matmuls_after), = results[0]["forward"]
    assert (first, peer) == ("send", 1) and matmuls_after >= 2
    (first, peer, matmuls_after), = results[2]["backward"]
    assert (first, peer) == ("send", 1) and matmuls_after >= 4