"""Collectives per method and pass, as the README's method table states them (fp32, bytes =
what each rank hands to the collective)."""
import pytest
import torch

from lasp2.parallel.comm import ALL_GATHER, REDUCE_SCATTER
from tests.helpers import make_inputs
from tests.parallel.cases import count_registered

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
        return [("all_to_all_single", into), ("all_to_all_single", out)], [("all_to_all_single", out), ("all_to_all_single", into)]
    if method == "ring":
        block = (B * C * H * (K + V) + g_token) * F32
        fwd = [("isend", block), ("irecv", 0)] * (world - 1)
        bwd_sends = [("isend", block)] * (2 * world - 1)
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
    for rank, got in results.items():
        assert got["forward"] == fwd_want, (rank, got["forward"])
        if method == "ring":
            sends, rest = bwd_want
            assert [c for c in got["backward"] if c[0] == "isend"] == sends
            assert [c for c in got["backward"] if c[0] not in ("isend", "irecv")] == rest
            assert sum(c[0] == "irecv" for c in got["backward"]) == len(sends)
        else:
            assert got["backward"] == bwd_want, (rank, got["backward"])


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
    for rank, got in results.items():
        if method == "allgather":
            assert got["forward"] == [(ALL_GATHER, kv)] and got["backward"] == [(REDUCE_SCATTER, world * kv)]
        elif method == "ring":
            assert got["forward"] == [("isend", kv), ("irecv", 0)] * (world - 1)
            assert [c for c in got["backward"] if c[0] == "isend"] == [("isend", kv)] * (2 * world - 1)
        else:
            kv_heads = max(HKV, world)  # replicated up to W when fewer
            into = B * C * (HQ * D + kv_heads * (D + DV)) * F32
            out = B * C * HQ * DV * F32
            assert got["forward"] == [("all_to_all_single", into), ("all_to_all_single", out)]
            assert got["backward"] == [("all_to_all_single", out), ("all_to_all_single", into)]
