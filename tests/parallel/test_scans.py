"""allscan (LASP-1's chain pipelined in column blocks) and logscan (recursive doubling over the
slots): exact at W = 6 beside LASP-2 and LASP-1 (W 1-4: test_methods.py, test_delta.py), the
messages each rank sends written out by hand, equal to the specs, and the bytes through a rank
flat in W (allscan) or growing like log W (logscan)."""
import pytest
import torch

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, Problem
from lasp2.parallel.spec import column_blocks, doubling_sends, evaluate
from tests.helpers import DECAY_FORMS, make_inputs, rel_err
from tests.parallel.cases import count_registered, run_registered
from tests.parallel.test_delta import _case as delta_case
from tests.parallel.test_delta import delta_shard
from tests.parallel.test_methods import _check, _linear_case

SIX = tuple(range(6))
STATE_PASSING = ["lasp2", "lasp1", "allscan", "logscan"]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("form", DECAY_FORMS + ("bidirectional",))
@pytest.mark.parametrize("method", STATE_PASSING)
def test_linear_state_passing_at_six_ranks(dist_workers, method, form, layout):
    """fp64, 168 tokens: 28 a rank, or twelve zigzag slots of 14."""
    kind, causal = ("none", False) if form == "bidirectional" else (form, True)
    inputs, do, reference = _linear_case(form, torch.float64)
    results = dist_workers.run(run_registered, SIX, "linear", method, inputs, do, layout, causal)
    _check(results, reference, 1e-10, kind == "head")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
@pytest.mark.parametrize("method", STATE_PASSING)
def test_delta_rule_state_passing_at_six_ranks(dist_workers, method, decay, layout):
    """fp64, 48 tokens, grouped value heads; the bytes each rank sends are the spec's."""
    x, do, ref = delta_case(decay, (2, 4))
    problem = Problem(B=2, N=48, W=6, S=1 if layout == "contiguous" else 2, H=4, Hkv=2, K=5, V=3, decay=decay,
                      dtype_bytes=8, state_bytes=8)
    for rank, got in dist_workers.run(delta_shard, SIX, method, x, do, layout).items():
        for name, want in ref.items():
            assert rel_err(got[name], want[:, got["positions"]]) < 1e-10, (rank, name)
        spec_fwd, spec_bwd = DELTA_METHODS[method].calls(problem, rank=rank)
        sent = [sorted(r for r in rows if r[0] != "recv") for rows in (got["forward"], got["backward"])]
        assert sent == [sorted(spec_fwd), sorted(spec_bwd)], rank


B, T, H, K, V = 2, 48, 3, 6, 16  # V = 16: allscan cuts each hop into P = 8 blocks of 2 columns
P = 8


def _zigzag_owner(world):
    return [s if s < world else 2 * world - 1 - s for s in range(2 * world)]


def _doubling_by_hand(owner):
    """Sends per rank of a recursive doubling over slots with these owners: slot s to s + d."""
    sends = [0] * (max(owner) + 1)
    d = 1
    while d < len(owner):
        for s in range(len(owner) - d):
            sends[owner[s]] += owner[s] != owner[s + d]
        d *= 2
    return sends


def test_the_hand_counts():
    """The hand count above, against a table worked out on paper (W = 3, zigzag: owners
    0 1 2 2 1 0; d = 1: 0->1, 1->2, 2->1, 1->0; d = 2: 0->2, 1->2, 2->1, 2->0; d = 4: 0->1, 1->0),
    and the spec's `doubling_sends` (forward, backward) against it."""
    assert _doubling_by_hand(_zigzag_owner(3)) == [3, 4, 3]
    assert _doubling_by_hand([0, 1, 2, 3, 4, 5]) == [3, 3, 2, 2, 1, 0]
    for world in (2, 3, 4, 6):
        for owner, S in ((list(range(world)), 1), (_zigzag_owner(world), 2)):
            assert [f for f, _ in doubling_sends(world, S)] == _doubling_by_hand(owner)
            assert [b for _, b in doubling_sends(world, S)] == _doubling_by_hand(owner[::-1])
    assert column_blocks(16, 8) == 8 and column_blocks(5, 8) == 5 and column_blocks(12, 8) == 6
    assert [evaluate("2·⌈log2(S·W)⌉", dict(S=1, W=W)) for W in (2, 3, 4, 5, 256)] == [2, 4, 4, 6, 16]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("kind", ["none", "token", "channel"])
@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_allscan_sends_each_hop_in_column_blocks(dist_workers, world, kind, layout):
    """Each hop of the chain is P sends of B·H·K·V/P fp32 values (the transitions stay home);
    contiguous: every receive of a hop is posted before its sends (which follow one by one as
    the blocks arrive); zigzag: a rank relays in both directions of the folded chain."""
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(count_registered, tuple(range(world)), "linear", "allscan", inputs, layout)
    block = ("send", B * H * K * (V // P) * 4)
    problem = Problem(B=B, N=T, W=world, S=1 if layout == "contiguous" else 2, H=H, K=K, V=V, decay=kind)
    for rank, got in results.items():
        if layout == "contiguous":
            up = [("recv", 0)] * P * (rank > 0) + [block] * P * (rank < world - 1)
            down = [("recv", 0)] * P * (rank < world - 1) + [block] * P * (rank > 0)
            assert got["forward"] == up and got["backward"] == down, rank
        hops = (rank < world - 1) + (rank > 0) if layout == "zigzag" else None
        for which in ("forward", "backward"):
            sends = [c for c in got[which] if c[0] == "send"]
            assert all(c == block for c in sends)
            if hops is not None:
                assert len(sends) == hops * P and sum(c[0] == "recv" for c in got[which]) == hops * P
        spec_fwd, spec_bwd = LINEAR_METHODS["allscan"].calls(problem, rank=rank)
        assert sorted(c for c in got["forward"] if c[0] == "send") == sorted(spec_fwd)
        assert sorted(c for c in got["backward"] if c[0] == "send") == sorted(spec_bwd)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("kind", ["none", "token", "channel"])
@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_logscan_sends_one_window_per_slot_and_round(dist_workers, world, kind, layout):
    """A window is the state and the transition, B·H·(K·V + Kg) fp32 values, sent from each
    slot to the slot 1, 2, 4, ... after it (before it, backward) when another rank holds it."""
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(count_registered, tuple(range(world)), "linear", "logscan", inputs, layout)
    kg = {"none": 0, "token": 1, "channel": K}[kind]
    window = ("send", B * H * (K * V + kg) * 4)
    owner = list(range(world)) if layout == "contiguous" else _zigzag_owner(world)
    up, down = _doubling_by_hand(owner), _doubling_by_hand(owner[::-1])
    problem = Problem(B=B, N=T, W=world, S=1 if layout == "contiguous" else 2, H=H, K=K, V=V, decay=kind)
    spec = LINEAR_METHODS["logscan"]
    for rank, got in results.items():
        assert [c for c in got["forward"] if c[0] == "send"] == [window] * up[rank], rank
        assert [c for c in got["backward"] if c[0] == "send"] == [window] * down[rank], rank
        assert sum(c[0] == "recv" for c in got["forward"]) == down[rank]  # what the others send it
        spec_fwd, spec_bwd = spec.calls(problem, rank=rank)
        assert sorted(spec_fwd) == [window] * up[rank] and sorted(spec_bwd) == [window] * down[rank]


def test_bytes_through_a_rank_as_w_grows():
    """From the specs (checked against the ranks above), per layer, forward + backward, on the
    busiest rank of a KDA-sized layer (B = 1, H = 32, K = V = 128, dense K x K transition, fp32):
    LASP-2's all-gather receives W − 1 slots' summaries; allscan sends (and receives) one state
    a pass whatever W; logscan one window (state and transition) per round and direction,
    at most 2·⌈log2 W⌉."""
    state = window_transition = 32 * 128 * 128 * 4

    def sent(method, W):
        return DELTA_METHODS[method].bytes_per_rank(Problem(B=1, N=1024 * W, W=W, H=32, Hkv=32, K=128, V=128,
                                                            decay="channel"))

    assert sent("lasp2", 256) * 255 == 255 * (2 * state + state)  # received: (h, M) forward, d backward, per slot
    assert [sent("allscan", W) for W in (2, 4, 6, 64, 256)] == [state] + [2 * state] * 4
    for W in (2, 4, 8, 64, 256):
        up, down = _doubling_by_hand(list(range(W))), _doubling_by_hand(list(range(W))[::-1])
        busiest = max(u + d for u, d in zip(up, down))
        assert sent("logscan", W) == busiest * (state + window_transition)
        assert busiest <= 2 * (W - 1).bit_length()


def auto_calls(group, family, inputs, do, network, layout):
    """Two calls of one layer shape through SequenceParallel(linear|delta="auto"): the pick, its
    reasons, the outputs and gradients, and what the second call (forward and backward) sent."""
    from lasp2.parallel import SequenceParallel, count_collectives, positions, shard
    from tests.helpers import leaf

    sp = SequenceParallel(group, linear="auto", delta="auto", layout=layout, chunk_size=8, network=network)
    x = {n: None if t is None else leaf(shard(t, group, layout)) for n, t in inputs.items() if n != "s0"}
    for call in range(2):
        for t in x.values():
            if t is not None:
                t.grad = None
        with count_collectives() as log:
            if family == "linear":
                o = sp.linear_attn(x["q"], x["k"], x["v"], x["g"], scale=0.7)
            else:
                o = sp.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=0.7)
            o.backward(shard(do, group, layout))
    return {"o": o.detach(), **{f"d{n}": None if t is None else t.grad for n, t in x.items()},
            "positions": positions(do.shape[1], group, layout), "decisions": list(sp.decisions.values()),
            "sent": sorted(r for r in log.rows() if r[0] != "recv")}


@pytest.mark.parametrize("network,layout,want", [("latency", "contiguous", "logscan"), ("bandwidth", "zigzag", "allscan")])
@pytest.mark.parametrize("family", ["linear", "delta"])
def test_auto_picks_by_the_network_and_stays_exact(dist_workers, family, network, layout, want):
    """W = 4: every rank picks the same method once for the shape (the second call reuses it),
    says why, and runs it exactly, with its spec's messages. Latency-bound links: logscan's 2
    rounds against the all-gather's 3 steps (contiguous); bandwidth-bound: allscan's one state
    a hop (zigzag, 8 slots)."""
    S = 1 if layout == "contiguous" else 2
    from lasp2.parallel.cost import Network

    nets = {"latency": Network(1e-3, 1e15, 1e-3, 1e15, ranks_per_node=64),
            "bandwidth": Network(0.0, 1e6, 0.0, 1e6, ranks_per_node=64)}
    if family == "linear":
        inputs, do, ref = _linear_case("token", torch.float64)
        inputs = {**inputs, "beta": None}
        methods, problem = LINEAR_METHODS, Problem(B=2, N=168, W=4, S=S, H=4, K=6, V=5, decay="token", dtype_bytes=8,
                                                    state_bytes=8)
    else:
        inputs, do, ref = delta_case("channel", (2, 4))
        methods, problem = DELTA_METHODS, Problem(B=2, N=48, W=4, S=S, H=4, Hkv=2, K=5, V=3, decay="channel",
                                                   dtype_bytes=8, state_bytes=8)
    results = dist_workers.run(auto_calls, tuple(range(4)), family, inputs, do, nets[network], layout)
    if family == "linear":  # test_methods' reference has another scale: the recurrence at 0.7
        from lasp2.ops import naive_recurrent_linear_attn
        from tests.helpers import leaf
        leaves = {n: leaf(inputs[n]) for n in "qkvg"}
        o, _ = naive_recurrent_linear_attn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], scale=0.7)
        o.backward(do)
        ref = {"o": o.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}
    for rank, got in results.items():
        (picked, why), = got["decisions"]
        assert picked == want and f"W=4: {want}" in why, why
        for name, value in ref.items():
            assert rel_err(got[name], value[:, got["positions"]]) < 1e-10, (rank, name)
        spec_fwd, spec_bwd = methods[want].calls(problem, rank=rank)
        assert got["sent"] == sorted(spec_fwd + spec_bwd), rank  # the second call's forward and backward


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("family,decay", [("linear", "none"), ("linear", "channel"), ("delta", "token")])
@pytest.mark.parametrize("method", STATE_PASSING)
def test_packed_documents_at_six_ranks(dist_workers, method, family, decay, layout):
    """Packed documents crossing slot edges (48 tokens: 8 a rank, or twelve zigzag slots of 4)."""
    from tests.parallel.test_documents import DOCUMENTS, _reference, packed_shard

    name = max(DOCUMENTS, key=lambda n: len(DOCUMENTS[n]))  # the most documents
    x, do, ref = _reference(family, decay, name)
    results = dist_workers.run(packed_shard, SIX, family, method, x, do, torch.tensor(DOCUMENTS[name]), layout)
    for rank, got in results.items():
        for n, want in ref.items():
            assert rel_err(got[n], want[:, got["positions"]]) < 1e-10, (rank, n)
