"""Packed documents across ranks: every rank's outputs and gradients equal the single-device
packed result on its tokens (fp64 1e-10), for documents whose boundaries fall on, just before
and just after slot edges, a document spanning every rank, W in {1, 2, 3, 4}, both layouts;
the collectives are the spec's for the decay form the kernels run (resets are per-token
decays), and a bad cu_seqlens raises before any collective."""
import functools

import pytest
import torch

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, Problem
from tests.helpers import leaf, make_inputs, rel_err
from tests.ops.test_delta_rule import delta_inputs
from tests.parallel.cases import run_under

T = 48
DOCUMENTS = {
    # slot edges: 24 (W=2), 16/32 (W=3), 12/24/36 (W=4, W=2 zigzag), 8/16/… (W=3 zigzag), 6/12/… (W=4 zigzag)
    "edges": [0, 1, 5, 6, 7, 12, 16, 24, 25, 33, 47, 48],
    "spanning": [0, 2, 46, 48],  # one document across every rank; most ranks see no boundary
}
LINEAR_HEADS, DELTA_HEADS, SOFTMAX_HEADS = 4, (2, 4), (4, 2)
FAMILIES = {"linear": LINEAR_METHODS, "delta": DELTA_METHODS, "softmax": SOFTMAX_METHODS}


def _inputs(family, decay):
    if family == "linear":
        return make_inputs(decay, B=1, T=T, H=LINEAR_HEADS, K=5, V=3, seed=11)
    if family == "softmax":
        gen = torch.Generator().manual_seed(14)
        return {"q": torch.randn(1, T, SOFTMAX_HEADS[0], 5, generator=gen, dtype=torch.float64),
                "k": torch.randn(1, T, SOFTMAX_HEADS[1], 5, generator=gen, dtype=torch.float64),
                "v": torch.randn(1, T, SOFTMAX_HEADS[1], 3, generator=gen, dtype=torch.float64)}
    x = delta_inputs(decay, B=1, T=T, Hk=DELTA_HEADS[0], Hv=DELTA_HEADS[1], seed=12)
    return {n: t for n, t in x.items() if n != "s0"}


def _call(family, fn, t, **kw):
    if family == "softmax":
        kw.pop("chunk_size", None)
        return fn(t["q"], t["k"], t["v"], scale=0.7, **kw)
    if family == "linear":
        return fn(t["q"], t["k"], t["v"], t["g"], scale=0.7, **kw)
    return fn(t["q"], t["k"], t["v"], t["beta"], t["g"], scale=0.7, **kw)


@functools.lru_cache(maxsize=None)
def _reference(family, decay, documents):
    """The single-device packed result (already checked against each document alone)."""
    from lasp2.ops import chunk_delta_rule, chunk_linear_attn
    from lasp2.ops.softmax_attn import softmax_attn

    x = _inputs(family, decay)
    leaves = {n: leaf(t) for n, t in x.items()}
    fn = {"linear": chunk_linear_attn, "delta": chunk_delta_rule, "softmax": softmax_attn}[family]
    o = _call(family, fn, leaves, cu_seqlens=torch.tensor(DOCUMENTS[documents]), chunk_size=4)
    o = o[0] if isinstance(o, tuple) else o  # the chunked ops also return a state
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    o.backward(do)
    return x, do, {"o": o.detach(), **{f"d{n}": t.grad for n, t in leaves.items() if t is not None}}


def packed_shard(group, family, method, x, do, cu_seqlens, layout):
    from lasp2.parallel import count_collectives, positions, shard

    local = {n: None if t is None else leaf(t if t.dim() == 1 else shard(t, group, layout)) for n, t in x.items()}
    fn = FAMILIES[family][method].fn
    with count_collectives() as forward:
        o = _call(family, fn, local, group=group, layout=layout, cu_seqlens=cu_seqlens, chunk_size=4)
    with count_collectives() as backward:
        o.backward(shard(do, group, layout))
    return {"o": o.detach(), **{f"d{n}": None if t is None else t.grad for n, t in local.items()},
            "positions": positions(T, group, layout), "forward": forward.rows(), "backward": backward.rows()}


HEADS_SPLIT = {"linear": LINEAR_HEADS, "delta": DELTA_HEADS[0], "softmax": SOFTMAX_HEADS[0]}  # Ulysses: % W
CASES = [(family, method, world, layout, decay, documents)
         for family, methods, decays in (("linear", ("lasp2", "lasp1", "allscan", "logscan", "ulysses"), ("none", "head", "token", "channel")),
                                         ("linear", ("allgather", "ring"), ("none", "head", "token")),
                                         ("delta", ("lasp2", "lasp1", "allscan", "logscan", "ulysses"), ("none", "token", "channel")),
                                         ("softmax", ("allgather", "ring", "ulysses"), ("none",)))
         for method in methods for world in (1, 2, 3, 4) for layout in ("contiguous", "zigzag")
         for decay in decays for documents in DOCUMENTS
         if not (method == "ulysses" and HEADS_SPLIT[family] % world)]


@pytest.mark.parametrize("family,method,world,layout,decay,documents", CASES)
def test_packed_methods_equal_one_device(dist_workers, family, method, world, layout, decay, documents):
    x, do, ref = _reference(family, decay, documents)
    cu = torch.tensor(DOCUMENTS[documents])
    results = dist_workers.run(packed_shard, tuple(range(world)), family, method, x, do, cu, layout)
    head_decay = family == "linear" and decay == "head"
    for rank, got in results.items():
        pos = got["positions"]
        for name, want in ref.items():
            if name == "dg" and head_decay:  # shared by every rank: the ranks' shares add up
                continue
            assert rel_err(got[name], want[:, pos]) < 1e-10, (rank, name)
    if head_decay:
        assert rel_err(sum(got["dg"] for got in results.values()), ref["dg"]) < 1e-10
    # LASP-2 and LASP-1 run the resets as per-token decays where the unpacked call had none or one
    # per head (their transitions travel); Ulysses ships the inputs as they are.
    resets_travel = family == "linear" and method in ("lasp2", "lasp1", "allscan", "logscan")
    effective = "channel" if decay == "channel" else ("token" if resets_travel else decay)
    heads = {"linear": dict(H=LINEAR_HEADS), "delta": dict(H=DELTA_HEADS[1], Hkv=DELTA_HEADS[0]),
             "softmax": dict(H=SOFTMAX_HEADS[0], Hkv=SOFTMAX_HEADS[1])}[family]
    problem = Problem(B=1, N=T, W=world, S=1 if layout == "contiguous" else 2, K=5, V=3, decay=effective,
                      dtype_bytes=8, state_bytes=8, decay_bytes=8, **heads)
    spec = FAMILIES[family][method]
    for rank, got in results.items():
        spec_fwd, spec_bwd = spec.calls(problem, rank=rank)
        sent = [sorted(r for r in rows if r[0] != "recv") for rows in (got["forward"], got["backward"])]
        assert sent == [sorted(spec_fwd), sorted(spec_bwd)], rank


CUDA_CASES = [(family, method, layout, decay) for family, methods, decays in (
    ("linear", ("lasp2", "lasp1", "allscan", "logscan", "allgather", "ring", "ulysses"), ("none", "token")),
    ("linear", ("lasp2", "lasp1", "allscan", "logscan", "ulysses"), ("channel",)),
    ("delta", ("lasp2", "lasp1", "allscan", "logscan", "ulysses"), ("none", "token", "channel")),
    ("softmax", ("allgather", "ring", "ulysses"), ("none",))) for method in methods
    for layout in ("contiguous", "zigzag") for decay in decays]


@pytest.mark.parametrize("family,method,layout,decay", CUDA_CASES)
def test_packed_methods_under_the_cuda_policy(dist_workers, family, method, layout, decay):
    """policy("cuda") (log-depth scans over chunks whose resets zero the transitions, one tile),
    W = 2: the single-device packed result."""
    x, do, ref = _reference(family, decay, "edges")
    results = dist_workers.run(run_under, (0, 1), "cuda", packed_shard, family, method, x, do,
                               torch.tensor(DOCUMENTS["edges"]), layout)
    for rank, got in results.items():
        for name, want in ref.items():
            if not (name == "dg" and decay == "head"):
                assert rel_err(got[name], want[:, got["positions"]]) < 1e-10, (rank, name)


def packed_refused(group, cu_seqlens, causal=True, layout="contiguous"):
    from lasp2.parallel import count_collectives, lasp2_linear_attn, shard

    x = make_inputs("none", B=1, T=T, H=2, K=3, V=3)
    local = {n: None if t is None else shard(t, group, layout) for n, t in x.items()}
    with count_collectives() as log:
        try:
            lasp2_linear_attn(local["q"], local["k"], local["v"], group=group, layout=layout, cu_seqlens=cu_seqlens,
                              causal=causal)
        except (TypeError, ValueError) as exc:
            return str(exc), log.count()
    return None, log.count()


@pytest.mark.parametrize("cu_seqlens,message", [
    (torch.tensor([0, 10, 40]), "cu_seqlens ends at 40"),
    (torch.tensor([0, 10, 10, 48]), "strictly increasing"),
    (torch.tensor([0, 10, 48], dtype=torch.int32), "int64"),
])
def test_bad_cu_seqlens_raises_before_any_collective(dist_workers, cu_seqlens, message):
    for got, collectives in dist_workers.run(packed_refused, (0, 1), cu_seqlens).values():
        assert got is not None and message in got and collectives == 0, got


def test_bidirectional_packed_documents_are_refused(dist_workers):
    for got, collectives in dist_workers.run(packed_refused, (0, 1), torch.tensor([0, 10, 48]), False).values():
        assert "causal=True" in got and collectives == 0


def packed_mismatch(group):
    from lasp2.parallel import count_collectives, lasp2_delta_rule

    x = delta_inputs("token", B=1, T=8, Hk=2, Hv=2)
    rank = group.rank()
    cu = torch.tensor([0, 3, 8]) if rank == 0 else torch.tensor([0, 4, 8])  # ranks disagree
    with count_collectives() as log:
        try:
            lasp2_delta_rule(x["q"][:, :4], x["k"][:, :4], x["v"][:, :4], x["beta"][:, :4], x["g"][:, :4], group=group,
                             validate=True, cu_seqlens=cu)
        except ValueError as exc:
            return str(exc), log.count()
    return None, log.count()


def test_validate_catches_ranks_that_pass_different_cu_seqlens(dist_workers):
    for message, collectives in dist_workers.run(packed_mismatch, (0, 1)).values():
        assert message is not None and "cu_seqlens" in message and collectives == 1, message


def test_ring_skips_blocks_of_documents_the_local_queries_do_not_reach():
    """Rank 1 of 2 (contiguous, 8 tokens a rank): documents [0, 6) and [6, 16). Its queries
    (8..15) reach back only to 6, inside rank 0's block: computed. With [0, 8) and [8, 16) rank
    0's block holds no key of theirs: skipped."""
    from lasp2.ops.documents import documents
    from lasp2.parallel.inputs import PackedShard
    from lasp2.parallel.layout import Layout
    from lasp2.parallel.ring import _Blocks

    def blocks(cu):
        docs = documents(torch.tensor(cu))
        packed = PackedShard(docs, torch.arange(8, 16), docs.starts(None)[8:16][None], docs.ids(None))
        return _Blocks(Layout("contiguous", 2), 1, 8, [], True, 1.0, None, packed)

    assert blocks([0, 6, 16]).visible(0) and blocks([0, 6, 16]).visible(1)
    assert not blocks([0, 8, 16]).visible(0) and blocks([0, 8, 16]).visible(1)
    unpacked = _Blocks(Layout("contiguous", 2), 1, 8, [], True, 1.0, None)
    assert unpacked.visible(0)


def test_positions_restart_at_each_document():
    from lasp2.parallel import SequenceParallel

    sp = SequenceParallel(None)
    cu = torch.tensor([0, 3, 10, 12])
    assert sp.positions(12, cu_seqlens=cu).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert sp.positions(12).tolist() == list(range(12))


def test_validate_codes_tell_apart_offsets_a_weighted_sum_would_not():
    from lasp2.ops.documents import documents
    from lasp2.parallel.inputs import PackedShard, _documents_code

    def code(offsets):
        return _documents_code(PackedShard(documents(torch.tensor(offsets)), None, None, None))

    a, b = code([0, 1, 8, 12]), code([0, 4, 6, 12])
    assert a[0] == b[0] and a != b
    assert all(float(v) == v and abs(v) < 2**53 for v in a)  # travels exactly as float64
