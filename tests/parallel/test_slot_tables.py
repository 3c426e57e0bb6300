"""Layouts beyond contiguous and zigzag: any assignment of equal slots to ranks (a slot table),
accepted by every method exactly (against the same references as the named layouts), with its
spec's bytes, and refused with a clear error before any collective when the table is wrong."""
import pytest
import torch

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, Problem, SequenceParallel, slot_table
from tests.helpers import DECAY_FORMS, rel_err
from tests.parallel.cases import rejected, run_registered
from tests.parallel.test_conv import _inputs as conv_inputs
from tests.parallel.test_conv import conv_shard, reference as conv_reference
from tests.parallel.test_delta import _case as delta_case
from tests.parallel.test_delta import delta_shard
from tests.parallel.test_documents import DOCUMENTS, _reference as packed_reference, packed_shard
from tests.parallel.test_methods import _check, _linear_case, _softmax_reference

# Each W with its slots per rank: a permutation of single slots, reversed zigzag, a shuffle of
# two and three slots a rank (168 tokens divide into every slot count here).
TABLES = {
    "W2-reversed-zigzag": [[1, 2], [0, 3]],
    "W3-permuted": [[2], [0], [1]],
    "W3-two-each": [[0, 4], [5, 2], [1, 3]],
    "W4-three-each": [[7, 0, 11], [3, 9, 4], [10, 1, 6], [2, 8, 5]],
}


def _ranks(name):
    return tuple(range(len(TABLES[name])))


def _splits_heads(method, table, heads) -> bool:
    """Ulysses needs the heads divisible by W (refusing otherwise is test_methods')."""
    return method != "ulysses" or heads % len(TABLES[table]) == 0


LINEAR_CASES = [(m, f, t) for m in LINEAR_METHODS for f in DECAY_FORMS + ("bidirectional",) for t in TABLES
                if (f == "bidirectional" or f in LINEAR_METHODS[m].decays) and _splits_heads(m, t, 4)]


@pytest.mark.parametrize("method,form,table", LINEAR_CASES)
def test_linear_methods_take_any_slot_table(dist_workers, method, form, table):
    kind, causal = ("none", False) if form == "bidirectional" else (form, True)
    inputs, do, reference = _linear_case(form, torch.float64)
    layout = slot_table(TABLES[table])
    results = dist_workers.run(run_registered, _ranks(table), "linear", method, inputs, do, layout, causal)
    _check(results, reference, 1e-10, kind == "head")


@pytest.mark.parametrize("method,table", [(m, t) for m in SOFTMAX_METHODS for t in TABLES if _splits_heads(m, t, 4)])
def test_softmax_methods_take_any_slot_table(dist_workers, method, table):
    inputs, do, reference = _softmax_reference((4, 2), True, torch.float64)
    results = dist_workers.run(run_registered, _ranks(table), "softmax", method, inputs, do, slot_table(TABLES[table]),
                               True)
    _check(results, reference, 1e-10, False)


@pytest.mark.parametrize("method,decay,table", [(m, d, t) for m in DELTA_METHODS for d in ("none", "token", "channel")
                                                for t in ("W2-reversed-zigzag", "W3-two-each") if _splits_heads(m, t, 2)])
def test_delta_methods_take_any_slot_table_and_send_their_spec(dist_workers, method, decay, table):
    """48 tokens: slots of 12 or 8; the bytes each rank sends are the spec's for that table."""
    x, do, ref = delta_case(decay, (2, 4))
    layout = slot_table(TABLES[table])
    problem = Problem(B=2, N=48, W=layout.world, S=layout.slots_per_rank, H=4, Hkv=2, K=5, V=3, decay=decay,
                      dtype_bytes=8, state_bytes=8, layout=layout)
    for rank, got in dist_workers.run(delta_shard, _ranks(table), method, x, do, layout).items():
        for name, want in ref.items():
            assert rel_err(got[name], want[:, got["positions"]]) < 1e-10, (rank, name)
        spec_fwd, spec_bwd = DELTA_METHODS[method].calls(problem, rank=rank)
        sent = [sorted(r for r in rows if r[0] != "recv") for rows in (got["forward"], got["backward"])]
        assert sent == [sorted(spec_fwd), sorted(spec_bwd)], rank


@pytest.mark.parametrize("table", ["W2-reversed-zigzag", "W3-two-each", "W4-three-each"])
@pytest.mark.parametrize("family,method", [("linear", "lasp2"), ("linear", "allscan"), ("linear", "logscan"),
                                           ("linear", "ring"), ("delta", "lasp1"), ("softmax", "allgather")])
def test_packed_documents_over_a_slot_table(dist_workers, family, method, table):
    """Documents crossing the edges of shuffled slots (48 tokens)."""
    x, do, ref = packed_reference(family, "token" if family != "softmax" else "none", "edges")
    results = dist_workers.run(packed_shard, _ranks(table), family, method, x, do, torch.tensor(DOCUMENTS["edges"]),
                               slot_table(TABLES[table]))
    for rank, got in results.items():
        for name, want in ref.items():
            assert rel_err(got[name], want[:, got["positions"]]) < 1e-10, (rank, name)


@pytest.mark.parametrize("table", list(TABLES))
def test_the_convolution_takes_any_slot_table(dist_workers, table):
    x, weight, bias, do = conv_inputs(2)  # 24 tokens: slots of 2 to 12; the halo is w − 1 = 1 token
    want = conv_reference(x, weight, bias, do)
    results = dist_workers.run(conv_shard, _ranks(table), x, weight, bias, do, slot_table(TABLES[table]))
    for rank, got in results.items():
        for name in ("o", "dx"):
            assert rel_err(got[name], want[name][:, got["positions"]]) < 1e-12, (rank, name)
    for name in ("dweight", "dbias"):  # replicated parameters: the ranks' parts sum to the whole
        assert rel_err(sum(got[name] for got in results.values()), want[name]) < 1e-12, name


def test_a_wrong_slot_table_is_refused_with_the_rule():
    with pytest.raises(ValueError, match=r"misses \[3\]; repeats \[1\]; every slot 0..3 must appear exactly once"):
        slot_table([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"the same number .* hold \[1, 2\]"):
        slot_table([[0], [1, 2]])
    with pytest.raises(ValueError, match=r"outside 0..3: \[7\]"):
        slot_table([[0, 7], [1, 2]])
    with pytest.raises(ValueError, match=r"is for 2 ranks, the group has 1"):
        SequenceParallel(None, layout=slot_table([[0, 3], [1, 2]]))


def test_a_table_for_another_group_size_raises_before_any_collective(dist_workers):
    inputs, do, _ = _linear_case("token", torch.float64)
    for kind, text, collectives in dist_workers.run(rejected, (0, 1, 2), "linear", "lasp2", inputs, do,
                                                    slot_table([[0, 3], [1, 2]]), True).values():
        assert kind == "ValueError" and "is for 2 ranks, the group has 3" in text and collectives == 0


@pytest.mark.parametrize("method", ["lasp2", "lasp1", "allscan", "logscan", "allgather", "ring"])
def test_linear_methods_send_their_spec_over_a_slot_table(dist_workers, method):
    """W = 3, two shuffled slots a rank: the bytes each rank hands over are its spec's for that
    table (the chains and doublings follow the table's slot owners)."""
    from tests.helpers import make_inputs
    from tests.parallel.cases import count_registered

    layout = slot_table(TABLES["W3-two-each"])
    inputs = make_inputs("token", B=2, T=48, H=4, K=6, V=8, dtype=torch.float32)
    problem = Problem(B=2, N=48, W=3, S=2, H=4, K=6, V=8, decay="token", layout=layout)
    for rank, got in dist_workers.run(count_registered, (0, 1, 2), "linear", method, inputs, layout).items():
        spec_fwd, spec_bwd = LINEAR_METHODS[method].calls(problem, rank=rank)
        sent = [sorted(r for r in rows if r[0] != "recv") for rows in (got["forward"], got["backward"])]
        assert sent == [sorted(spec_fwd), sorted(spec_bwd)], (rank, sent)
