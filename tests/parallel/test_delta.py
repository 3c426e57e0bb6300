"""LASP-2 for the delta rule: every rank's output and the gradients of q, k, v, beta and the gate
equal the token-by-token recurrence (fp64) on its tokens, W in {1, 2, 3, 4}, both layouts,
every gate form, grouped and plain heads; the collectives are the spec's."""
import functools

import pytest
import torch

from lasp2.parallel import DELTA_METHODS, Problem
from tests.helpers import leaf, rel_err
from tests.ops.test_delta_rule import delta_inputs

T = 48


def delta_shard(group, method, x, do, layout, chunk_size=8, device_policy="cpu"):
    from lasp2.ops import policy
    from lasp2.parallel import count_collectives, positions, shard

    local = {n: None if t is None else leaf(shard(t, group, layout)) for n, t in x.items() if n != "s0"}
    with count_collectives() as forward, policy(device_policy):
        o = DELTA_METHODS[method].fn(local["q"], local["k"], local["v"], local["beta"], local["g"], scale=0.7,
                                     group=group, layout=layout, chunk_size=chunk_size)
    with count_collectives() as backward:
        o.backward(shard(do, group, layout))
    return {"o": o.detach(), **{f"d{n}": None if t is None else t.grad for n, t in local.items()},
            "positions": positions(x["q"].shape[1], group, layout), "forward": forward.rows(),
            "backward": backward.rows()}


def _recurrence(x, do):
    """The fp64 token-by-token outputs and gradients of x's values."""
    from lasp2.ops import naive_recurrent_delta_rule

    leaves = {n: leaf(t.double()) for n, t in x.items() if n != "s0" and t is not None}
    o, _ = naive_recurrent_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"), scale=0.7)
    o.backward(do.double())
    return {"o": o.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


@functools.lru_cache(maxsize=None)
def _case(decay, heads):
    x = delta_inputs(decay, T=T, Hk=heads[0], Hv=heads[1], seed=3)
    do = torch.randn(2, T, heads[1], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return x, do, _recurrence(x, do)


def delta_refused(group, method, x, layout):
    from lasp2.parallel import count_collectives, shard

    local = {n: None if t is None else shard(t, group, layout) for n, t in x.items() if n != "s0"}
    with count_collectives() as log:
        try:
            DELTA_METHODS[method].fn(local["q"], local["k"], local["v"], local["beta"], local["g"], group=group,
                                     layout=layout)
        except ValueError as exc:
            return str(exc), log.count()
    return None, log.count()


@pytest.mark.parametrize("heads", [(2, 4), (2, 2)], ids=["gva", "plain"])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", list(DELTA_METHODS))
def test_delta_rule_methods_equal_the_recurrence(dist_workers, method, world, layout, decay, heads):
    x, do, ref = _case(decay, heads)
    ranks = tuple(range(world))
    if method == "ulysses" and heads[0] % world:
        for message, collectives in dist_workers.run(delta_refused, ranks, method, x, layout).values():
            assert "key heads do not divide" in message and collectives == 0
        return
    results = dist_workers.run(delta_shard, ranks, method, x, do, layout)
    problem = Problem(B=2, N=T, W=world, S=1 if layout == "contiguous" else 2, H=heads[1], Hkv=heads[0], K=5, V=3,
                      decay=decay, dtype_bytes=8, state_bytes=8)
    for rank, got in results.items():
        pos = got["positions"]
        for name, want in ref.items():
            assert rel_err(got[name], want[:, pos]) < 1e-10, (rank, name)
        spec_fwd, spec_bwd = DELTA_METHODS[method].calls(problem, rank=rank)
        sent = [sorted(r for r in rows if r[0] != "recv") for rows in (got["forward"], got["backward"])]
        assert sent == [sorted(spec_fwd), sorted(spec_bwd)], rank
        if world > 1 and method == "lasp2":  # one all-gather of S·B·Hv·K·(V + K) values forward, S·B·Hv·K·V back
            S = problem.S
            assert got["forward"] == [("all_gather", S * 2 * heads[1] * 5 * (3 + 5) * 8)]
            assert got["backward"] == [("all_gather", S * 2 * heads[1] * 5 * 3 * 8)]


@pytest.mark.parametrize("decay", ["none", "token", "channel"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["lasp2", "lasp1", "allscan", "logscan"])
def test_the_cuda_policy_is_exact_too(dist_workers, method, layout, decay):
    """Under policy("cuda") the state is carried by log-depth scans over the chunks' K x K maps
    and the backward recomputes every chunk term from the inputs (the CPU's carries chunk by
    chunk and keeps those made by matmuls and the solve): the same results."""
    x, do, ref = _case(decay, (2, 4))
    for rank, got in dist_workers.run(delta_shard, (0, 1, 2), method, x, do, layout, 8, "cuda").items():
        for name, want in ref.items():
            assert rel_err(got[name], want[:, got["positions"]]) < 1e-10, (rank, name)


@pytest.mark.parametrize("device_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", list(DELTA_METHODS))
def test_bf16_inputs_within_the_ops_bound(dist_workers, method, layout, device_policy):
    """bf16 inputs, W = 2 (states, maps and scans in fp32; under the CUDA policy bf16 chunk
    matmuls): within the op's stated bf16 bound of 2e-2 of the recurrence on the same values."""
    x, do, _ = _case("token", (2, 4))
    low = {n: t.bfloat16() for n, t in x.items()}
    ref = _recurrence(low, do.bfloat16())
    for rank, got in dist_workers.run(delta_shard, (0, 1), method, low, do.bfloat16(), layout, 8, device_policy).items():
        assert got["o"].dtype == torch.bfloat16
        for name, want in ref.items():
            assert rel_err(got[name].double(), want[:, got["positions"]]) < 2e-2, (rank, name)


def delta_unequal(group, x, do, bounds):
    import torch.distributed as dist

    lo, hi = bounds[dist.get_rank(group)]
    local = {n: None if t is None else leaf(t[:, lo:hi]) for n, t in x.items() if n != "s0"}
    o = DELTA_METHODS["lasp2"].fn(local["q"], local["k"], local["v"], local["beta"], local["g"], scale=0.7,
                                  group=group, chunk_size=8)
    o.backward(do[:, lo:hi])
    return {"o": o.detach(), **{f"d{n}": None if t is None else t.grad for n, t in local.items()}}


def test_contiguous_shards_may_differ_in_length(dist_workers):
    x, do, ref = _case("channel", (2, 4))
    bounds = [(0, 5), (5, 30), (30, 48)]
    for rank, got in dist_workers.run(delta_unequal, (0, 1, 2), x, do, bounds).items():
        lo, hi = bounds[rank]
        for name, want in ref.items():
            assert rel_err(got[name], want[:, lo:hi]) < 1e-10, (rank, name)


def delta_rejected(group, x):
    from lasp2.parallel import count_collectives

    with count_collectives() as log:
        try:
            DELTA_METHODS["lasp2"].fn(x["q"], x["k"], x["v"][:, :, :3], x["beta"][:, :, :3], None, group=group)
        except ValueError as exc:
            return str(exc), log.count()
    return None, log.count()


def test_bad_input_raises_before_any_collective(dist_workers):
    x, _, _ = _case("none", (2, 4))
    for message, collectives in dist_workers.run(delta_rejected, (0, 1), x).values():
        assert "multiple of the key heads" in message and collectives == 0


def delta_overlap(group, x, layout):
    from lasp2.parallel import shard
    from tests.parallel.cases import _Overlap

    local = {n: None if t is None else leaf(shard(t, group, layout).float()) for n, t in x.items() if n != "s0"}
    with _Overlap() as forward:
        o = DELTA_METHODS["lasp2"].fn(local["q"], local["k"], local["v"], local["beta"], local["g"], group=group,
                                      layout=layout, chunk_size=8)
    with _Overlap() as backward:
        o.sum().backward()
    return forward.done, backward.done


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("decay", ["none", "channel"])
def test_lasp2_overlaps_its_gathers_with_local_work(dist_workers, decay, layout):
    """Forward: the outputs from a zero state (the query-side scores, Qe, P Ū, Qe S: 3+
    batched matmuls) run while the slot summaries travel; backward: the query-side gradients
    (5 batched matmuls) while the gradients on the incoming states travel."""
    x, _, _ = _case(decay, (2, 4))
    for rank, (forward, backward) in dist_workers.run(delta_overlap, (0, 1, 2), x, layout).items():
        (fwd_kind, fwd_matmuls), = forward
        (bwd_kind, bwd_matmuls), = backward
        assert fwd_kind == bwd_kind == "_allgather_base_"
        assert fwd_matmuls >= 3 and bwd_matmuls >= 5, (rank, fwd_matmuls, bwd_matmuls)
