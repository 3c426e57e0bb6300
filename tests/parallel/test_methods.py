"""Every registered method, W in {1..4}, both layouts, causal and bidirectional: every rank's
output and gradients equal the fp64 token-by-token recurrence (softmax: attention written out
in fp64) on its tokens."""
import functools

import pytest
import torch

from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS
from tests.helpers import DECAY_FORMS, make_inputs, rel_err
from tests.parallel.cases import rejected, run_registered, run_under, single_device, softmax_reference

# 168 tokens: 24 | 168, so both layouts shard for W <= 4; shards and zigzag slots (21..168
# tokens) are never a multiple of the kernels' chunk of 16.
T = 168
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
UNSUPPORTED = {("ring", "channel"), ("allgather", "channel")}


def _softmax_inputs(heads, kv_heads, dtype):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return {"q": randn(2, T, heads, 8), "k": randn(2, T, kv_heads, 8), "v": randn(2, T, kv_heads, 6), "g": None}


def _check(results, ref, tol, head_decay):
    for rank, got in results.items():
        pos = got["positions"]
        for name in ("o", "dq", "dk", "dv"):
            err = rel_err(got[name], ref[name][:, pos])
            assert err <= tol, f"rank {rank} {name}: relative error {err:.2e} > {tol}"
    if ref["dg"] is not None:
        if head_decay:  # a replicated [H] parameter: the ranks' partial gradients sum to the total
            total = sum(got["dg"] for got in results.values())
            assert rel_err(total, ref["dg"].sum(dim=(0, 1))) <= tol
        else:
            for rank, got in results.items():
                assert rel_err(got["dg"], ref["dg"][:, got["positions"]]) <= tol, f"rank {rank} dg"


def _expect_error(dist_workers, ranks, args, message):
    """Every rank refuses, with the rule in its message, before any collective (caught inside
    the ranks: the pool stays up)."""
    for rank, (kind, text, collectives) in dist_workers.run(rejected, ranks, *args).items():
        assert kind == "ValueError" and message in text, (rank, kind, text)
        assert collectives == 0, (rank, collectives)


@functools.lru_cache(maxsize=None)
def _linear_case(form: str, dtype: torch.dtype):
    """(inputs, output gradient, reference), shared by every method, W and layout."""
    kind, causal = ("none", False) if form == "bidirectional" else (form, True)
    inputs = make_inputs(kind, B=2, T=T, H=4, K=6, V=5, dtype=dtype, seed=1)
    do = torch.randn(2, T, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    return inputs, do, single_device(inputs, do, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("form", DECAY_FORMS + ("bidirectional",))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", list(LINEAR_METHODS))
def test_linear_methods(dist_workers, method, world, form, layout, dtype):
    kind, causal = ("none", False) if form == "bidirectional" else (form, True)
    inputs, do, reference = _linear_case(form, dtype)
    ranks = tuple(range(world))
    args = ("linear", method, inputs, do, layout, causal)
    if kind not in LINEAR_METHODS[method].decays:  # refused at any W, so a setup does not break when it scales out
        assert (method, kind) in UNSUPPORTED
        return _expect_error(dist_workers, ranks, args, "not supported by this method")
    if world > 1 and method == "ulysses" and 4 % world:
        return _expect_error(dist_workers, ranks, args, "heads divisible by W")
    results = dist_workers.run(run_registered, ranks, *args)
    _check(results, reference, TOLERANCE[dtype], kind == "head")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("form", DECAY_FORMS + ("bidirectional",))
@pytest.mark.parametrize("method", list(LINEAR_METHODS))
def test_linear_methods_under_the_cuda_policy(dist_workers, method, form, layout):
    """policy("cuda"): log-depth scans, one tile, the fixed overlap; W = 2 (zigzag: 4 slots)
    and fp64, as exact as the CPU policy."""
    kind, causal = ("none", False) if form == "bidirectional" else (form, True)
    if kind not in LINEAR_METHODS[method].decays:
        return
    inputs, do, reference = _linear_case(form, torch.float64)
    results = dist_workers.run(run_under, (0, 1), "cuda", run_registered, "linear", method, inputs, do, layout, causal)
    _check(results, reference, TOLERANCE[torch.float64], kind == "head")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", list(SOFTMAX_METHODS))
def test_softmax_methods_under_the_cuda_policy(dist_workers, method, layout):
    inputs, do, reference = _softmax_reference((4, 2), True, torch.float64)
    results = dist_workers.run(run_under, (0, 1), "cuda", run_registered, "softmax", method, inputs, do, layout, True)
    _check(results, reference, TOLERANCE[torch.float64], False)


@functools.lru_cache(maxsize=None)
def _softmax_reference(heads, causal, dtype):
    inputs = _softmax_inputs(*heads, dtype)
    do = torch.randn(2, T, heads[0], 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    return inputs, do, softmax_reference(inputs, do, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", list(SOFTMAX_METHODS))
def test_softmax_methods(dist_workers, method, world, causal, layout, heads, dtype):
    inputs, do, reference = _softmax_reference(heads, causal, dtype)
    ranks = tuple(range(world))
    args = ("softmax", method, inputs, do, layout, causal)
    if world > 1 and method == "ulysses" and 4 % world:
        return _expect_error(dist_workers, ranks, args, "heads divisible by W")
    results = dist_workers.run(run_registered, ranks, *args)
    _check(results, reference, TOLERANCE[dtype], False)


@pytest.mark.parametrize("device_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", list(LINEAR_METHODS))
def test_linear_methods_bf16(dist_workers, method, layout, device_policy):
    """bf16 inputs (states and scans in fp32; under the CUDA policy bf16 chunk matmuls) within
    the ops' stated bf16 bound of 1e-2."""
    inputs = make_inputs("token", B=1, T=48, H=2, K=4, V=4, dtype=torch.bfloat16, seed=1)
    do = torch.randn(1, 48, 2, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    results = dist_workers.run(run_under, (0, 1), device_policy, run_registered, "linear", method, inputs, do, layout, True)
    _check(results, single_device(inputs, do, True), 1e-2, False)
