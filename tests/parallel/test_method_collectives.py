"""Collectives per method and pass (bytes = what each rank hands to the collective): written out
here by hand, and equal to what each method's spec (and so the README's method table) says,
for every rank, W in {2, 3, 4} and both layouts."""
import pytest
import torch

from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS, Problem
from tests.helpers import make_inputs
from tests.parallel.cases import count_registered

ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = "all_gather", "reduce_scatter", "all_to_all"

B, T, H, K, V = 2, 48, 4, 6, 5  # linear
HQ, HKV, D, DV = 4, 2, 8, 6  # softmax (GQA)
F32, F64 = 4, 8


def linear_expected(method, world, kind, layout):
    C, S = T // world, (1 if layout == "contiguous" else 2)
    g_token = B * C * H if kind == "token" else 0
    g_chan = B * C * H * K if kind == "channel" else 0
    if method == "lasp2":
        kg = {"none": 0, "head": 1, "token": 1, "channel": K}[kind]
        return [(ALL_GATHER, S * B * H * (K * V + kg) * F32)], [(ALL_GATHER, S * B * H * K * V * F32)]
    if method == "allgather":
        n = (B * C * H * (K + V) + g_token) * F32
        return [(ALL_GATHER, n)], [(REDUCE_SCATTER, world * n)]
    if method == "ulysses":
        into, out = (B * C * H * (K + K + V) + g_token + g_chan) * F32, B * C * H * V * F32
        return [(ALL_TO_ALL, into), (ALL_TO_ALL, out)], [(ALL_TO_ALL, out), (ALL_TO_ALL, into)]
    if method == "ring":
        block = (B * C * H * (K + V) + g_token) * F32
        fwd = [("send", block), ("recv", 0)] * (world - 1)
        bwd_sends = [("send", block)] * (2 * world - 1)
        offsets = [(ALL_GATHER, S * B * H * F64)] if kind == "token" else []
        back = [(REDUCE_SCATTER, world * S * B * H * F64)] if kind == "token" else []
        return offsets + fwd, (bwd_sends, back)
    raise AssertionError(method)


# (combinations a method refuses before any collective are tested in test_methods)
LINEAR_CASES = [
    (method, world, kind, layout)
    for method in ("lasp2", "allgather", "ulysses", "ring")
    for world in (2, 3, 4)
    for kind in ("none", "head", "token", "channel")
    for layout in ("contiguous", "zigzag")
    if not (method in ("ring", "allgather") and kind == "channel") and not (method == "ulysses" and H % world)
]


@pytest.mark.parametrize("method,world,kind,layout", LINEAR_CASES)
def test_linear_method_collectives(dist_workers, method, world, kind, layout):
    inputs = make_inputs(kind, B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(count_registered, tuple(range(world)), "linear", method, inputs, layout)
    fwd_want, bwd_want = linear_expected(method, world, kind, layout)
    problem = Problem(B=B, N=T, W=world, S=1 if layout == "contiguous" else 2, H=H, K=K, V=V, decay=kind)
    for rank, got in results.items():
        assert got["forward"] == fwd_want, (rank, got["forward"])
        if method == "ring":
            sends, rest = bwd_want
            assert [c for c in got["backward"] if c[0] == "send"] == sends
            assert [c for c in got["backward"] if c[0] not in ("send", "recv")] == rest
            assert sum(c[0] == "recv" for c in got["backward"]) == len(sends)
        else:
            assert got["backward"] == bwd_want, (rank, got["backward"])
        spec_fwd, spec_bwd = LINEAR_METHODS[method].calls(problem, rank=rank)
        assert _sent(got["forward"]) == sorted(spec_fwd) and _sent(got["backward"]) == sorted(spec_bwd), rank


def _sent(rows):
    """What a rank handed over, receives left out, in a fixed order."""
    return sorted(r for r in rows if r[0] != "recv")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp1_chain_lengths(dist_workers, world, layout):
    inputs = make_inputs("token", B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    results = dist_workers.run(count_registered, tuple(range(world)), "linear", "lasp1", inputs, layout)
    hops = world - 1 if layout == "contiguous" else 2 * world - 2
    for which in ("forward", "backward"):
        sends = [c for r in range(world) for c in results[r][which] if c[0] == "send"]
        assert sends == [("send", B * H * K * V * F32)] * hops
        assert sum(c[0] == "recv" for r in range(world) for c in results[r][which]) == hops
    problem = Problem(B=B, N=T, W=world, S=1 if layout == "contiguous" else 2, H=H, K=K, V=V, decay="token")
    for rank in range(world):
        spec_fwd, spec_bwd = LINEAR_METHODS["lasp1"].calls(problem, rank=rank)
        assert _sent(results[rank]["forward"]) == sorted(spec_fwd)
        assert _sent(results[rank]["backward"]) == sorted(spec_bwd)


SOFTMAX_CASES = [(m, w, lay) for m in ("allgather", "ring", "ulysses") for w in (2, 3, 4)
                 for lay in ("contiguous", "zigzag") if not (m == "ulysses" and HQ % w)]


@pytest.mark.parametrize("method,world,layout", SOFTMAX_CASES)
def test_softmax_method_collectives(dist_workers, method, world, layout):
    gen = torch.Generator().manual_seed(0)
    inputs = {"q": torch.randn(B, T, HQ, D, generator=gen), "k": torch.randn(B, T, HKV, D, generator=gen),
              "v": torch.randn(B, T, HKV, DV, generator=gen), "g": None}
    results = dist_workers.run(count_registered, tuple(range(world)), "softmax", method, inputs, layout)
    C = T // world
    kv = B * C * HKV * (D + DV) * F32
    problem = Problem(B=B, N=T, W=world, S=1 if layout == "contiguous" else 2, H=HQ, Hkv=HKV, K=D, V=DV)
    for rank, got in results.items():
        spec_fwd, spec_bwd = SOFTMAX_METHODS[method].calls(problem, rank=rank)
        assert _sent(got["forward"]) == sorted(spec_fwd) and _sent(got["backward"]) == sorted(spec_bwd), rank
        if method == "allgather":
            assert got["forward"] == [(ALL_GATHER, kv)] and got["backward"] == [(REDUCE_SCATTER, world * kv)]
        elif method == "ring":
            assert got["forward"] == [("send", kv), ("recv", 0)] * (world - 1)
            assert [c for c in got["backward"] if c[0] == "send"] == [("send", kv)] * (2 * world - 1)
        else:
            kv_heads = max(HKV, world)  # replicated up to W when fewer
            into = B * C * (HQ * D + kv_heads * (D + DV)) * F32
            out = B * C * HQ * DV * F32
            assert got["forward"] == [(ALL_TO_ALL, into), (ALL_TO_ALL, out)]
            assert got["backward"] == [(ALL_TO_ALL, out), (ALL_TO_ALL, into)]


@pytest.mark.parametrize("family", ["linear", "softmax"])
def test_ring_blocks_travel_in_the_input_dtype(dist_workers, family):
    """bf16 inputs: K/V blocks travel as bf16 (half the bytes of fp32), their gradients in fp32."""
    gen = torch.Generator().manual_seed(0)
    heads = H if family == "linear" else HKV
    inputs = {"q": torch.randn(B, T, H, K, generator=gen).bfloat16(), "k": torch.randn(B, T, heads, K, generator=gen).bfloat16(),
              "v": torch.randn(B, T, heads, V, generator=gen).bfloat16(), "g": None}
    results = dist_workers.run(count_registered, (0, 1), family, "ring", inputs, "contiguous")
    block = B * (T // 2) * heads * (K + V)
    problem = Problem(B=B, N=T, W=2, H=H, Hkv=heads, K=K, V=V, dtype_bytes=2)
    spec = (LINEAR_METHODS if family == "linear" else SOFTMAX_METHODS)["ring"]
    for rank, got in results.items():
        assert _sent(got["forward"]) == [("send", 2 * block)]
        assert _sent(got["backward"]) == sorted([("send", 2 * block)] + [("send", 4 * block)] * 2)
        assert [sorted(c) for c in spec.calls(problem, rank=rank)] == [_sent(got["forward"]), _sent(got["backward"])]


@pytest.mark.parametrize("method", ["allgather", "ring", "ulysses"])
def test_bf16_inputs_with_an_fp32_decay_send_what_the_spec_says(dist_workers, method):
    """K/V travel promoted with the fp32 log decay, Ulysses' output in the input dtype."""
    inputs = make_inputs("token", B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    inputs = {n: t if n == "g" else t.bfloat16() for n, t in inputs.items()}
    results = dist_workers.run(count_registered, (0, 1), "linear", method, inputs, "contiguous")
    problem = Problem(B=B, N=T, W=2, H=H, K=K, V=V, decay="token", dtype_bytes=2, decay_bytes=4)
    for rank, got in results.items():
        spec_fwd, spec_bwd = LINEAR_METHODS[method].calls(problem, rank=rank)
        assert _sent(got["forward"]) == sorted(spec_fwd) and _sent(got["backward"]) == sorted(spec_bwd), (rank, got)
