"""Every rank's output and gradients equal the single-device result on its slice."""
import pytest
import torch

from lasp2.ops import chunk_linear_attn
from tests.helpers import DECAY_FORMS, make_inputs, rel_err
from tests.parallel.cases import METHODS, even_bounds, reference_slice, run_shard, run_shard_in_tiles, single_device

FORMS = DECAY_FORMS + ("bidirectional",)
T = 84  # divisible by 1..4; shards of 21-84 tokens with chunk_size 16 end in partial chunks


def check_ranks(results, ref, bounds, head_decay, tol):
    for rank, (lo, hi) in enumerate(bounds):
        got = results[rank]
        for name, t in got.items():
            if ref[name] is None:
                assert t is None
                continue
            err = rel_err(t, reference_slice(ref, name, lo, hi, head_decay))
            assert err <= tol, f"rank {rank} {name}: relative error {err:.2e} > {tol}"


def run_case(dist_workers, method, ranks, form, dtype, tol, bounds, total_len=T):
    kind = "none" if form == "bidirectional" else form
    causal = form != "bidirectional"
    inputs = make_inputs(kind, B=2, T=total_len, H=3, K=6, V=5, dtype=dtype, seed=len(ranks))
    do = torch.randn(2, total_len, 3, 5, dtype=dtype, generator=torch.Generator().manual_seed(7))
    results = dist_workers.run(run_shard, ranks, method, inputs, do, bounds, causal)
    check_ranks(results, single_device(inputs, do, causal), bounds, form == "head", tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_single_device(dist_workers, method, world, form, dtype, tol):
    run_case(dist_workers, method, tuple(range(world)), form, dtype, tol, even_bounds(T, world))


# the CUDA policy's fixed schedule does the same for any tile size: one is enough
@pytest.mark.parametrize("chunks_per_tile,policy", [(1, "cpu"), (2, "cpu"), (1, "cuda")])
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_single_device_in_small_tiles(dist_workers, method, world, form, chunks_per_tile, policy):
    """The per-chunk kernels run over tiles of 1 or 2 chunks (16 tokens each): every rank's
    shard spans several tiles, and the intra-chunk outputs and query-side gradients computed
    while the states travel meet the inter-chunk terms of the same tile, under either device
    policy's overlap (CPU: as many tiles as the exchange leaves time for; CUDA: all of them)."""
    inputs = make_inputs(form, B=2, T=T, H=3, K=6, V=5, seed=world)
    do = torch.randn(2, T, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    bounds = even_bounds(T, world)
    results = dist_workers.run(run_shard_in_tiles, tuple(range(world)), chunks_per_tile * 3 * 16 * 16, policy, method,
                               inputs, do, bounds)
    check_ranks(results, single_device(inputs, do), bounds, form == "head", 1e-10)


@pytest.mark.parametrize("form", ["none", "token", "channel", "bidirectional"])
@pytest.mark.parametrize("method", list(METHODS))
def test_sub_group(dist_workers, method, form):
    """Ranks {1, 3} of 4 form the group: group ranks 0 and 1 map to global ranks 1 and 3."""
    run_case(dist_workers, method, (1, 3), form, torch.float64, 1e-10, even_bounds(T, 2))


@pytest.mark.parametrize("form", ["head", "channel", "bidirectional"])
@pytest.mark.parametrize("method", list(METHODS))
def test_uneven_shards(dist_workers, method, form):
    """Shards need not be equal: 7, 23 and 20 tokens."""
    run_case(dist_workers, method, (0, 1, 2), form, torch.float64, 1e-10, [(0, 7), (7, 30), (30, 50)], total_len=50)


@pytest.mark.parametrize("fn", list(METHODS.values()))
@pytest.mark.parametrize("causal", [True, False])
def test_group_none_is_the_single_device_op(fn, causal):
    x = make_inputs("none" if not causal else "token", T=40)
    expected, _ = chunk_linear_attn(x["q"], x["k"], x["v"], x["g"], causal=causal, scale=0.5)
    out = fn(x["q"], x["k"], x["v"], x["g"], causal=causal, scale=0.5, group=None)
    assert torch.equal(out, expected)
