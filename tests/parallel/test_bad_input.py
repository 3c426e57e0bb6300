"""Bad input raises before any collective; with validate=True, ranks that disagree all raise."""
import pytest
import torch

from tests.helpers import make_inputs
from tests.parallel.cases import call_and_catch, call_registered_and_catch as call_and_catch_registered

METHODS = ["lasp2", "lasp1", "allscan", "logscan"]


def _inputs(**overrides):
    x = make_inputs("token", B=2, T=12, H=3, K=4, V=4, dtype=torch.float32)
    x.update(overrides)
    return x


# Shape, dtype and argument errors raise on every call. Value checks (a positive log decay) cost a
# host sync, so they run under validate=True only: test_validate_spreads_one_ranks_local_error.
LOCAL_CASES = {
    "q/k shapes": (dict(k=torch.randn(2, 12, 3, 5)), "ValueError", "same shape"),
    "integer values": (dict(v=torch.ones(2, 12, 3, 4, dtype=torch.int32)), "TypeError", "floating"),
    "empty shard": (dict(q=torch.randn(2, 0, 3, 4), k=torch.randn(2, 0, 3, 4), v=torch.randn(2, 0, 3, 4),
                         g=torch.zeros(2, 0, 3)), "ValueError", "empty"),
    "decay with causal=False": (dict(), "ValueError", "causal=False"),
}


@pytest.mark.parametrize("case", list(LOCAL_CASES))
@pytest.mark.parametrize("method", METHODS)
def test_local_errors_raise_before_any_collective(dist_workers, method, case):
    overrides, exc, message = LOCAL_CASES[case]
    causal = [case != "decay with causal=False"] * 2
    results = dist_workers.run(call_and_catch, (0, 1), method, [_inputs(**overrides)] * 2, False, causal)
    for rank in range(2):
        err_type, msg, collectives = results[rank]
        assert err_type == exc and message in msg, (rank, err_type, msg)
        assert collectives == 0


MISMATCHES = {
    "num_heads": dict(q=torch.randn(2, 12, 2, 4), k=torch.randn(2, 12, 2, 4), v=torch.randn(2, 12, 2, 4),
                      g=-torch.rand(2, 12, 2)),
    "value_dim": dict(v=torch.randn(2, 12, 3, 6)),
    "dtype": dict(q=torch.randn(2, 12, 3, 4, dtype=torch.float64), k=torch.randn(2, 12, 3, 4, dtype=torch.float64),
                  v=torch.randn(2, 12, 3, 4, dtype=torch.float64)),
    "decay form": dict(g=-torch.rand(3)),
}


@pytest.mark.parametrize("field", list(MISMATCHES))
@pytest.mark.parametrize("method", METHODS)
def test_validate_catches_ranks_that_disagree(dist_workers, method, field):
    per_rank = [_inputs(), _inputs(**MISMATCHES[field])]
    results = dist_workers.run(call_and_catch, (0, 1), method, per_rank, True)
    for rank in range(2):
        err_type, msg, collectives = results[rank]
        assert err_type == "ValueError" and f"{field} differs between ranks" in msg, (rank, msg)
        assert collectives == 1  # the validation gather only


@pytest.mark.parametrize("method", METHODS)
def test_validate_catches_causal_mismatch(dist_workers, method):
    x = make_inputs("none", B=2, T=12, H=3, K=4, V=4, dtype=torch.float32)
    results = dist_workers.run(call_and_catch, (0, 1, 2), method, [x] * 3, True, [True, True, False])
    for rank in range(3):
        assert results[rank][0] == "ValueError" and "causal differs" in results[rank][1]


@pytest.mark.parametrize("method", METHODS)
def test_validate_spreads_one_ranks_local_error(dist_workers, method):
    """Only rank 1 has a positive decay: it raises its own error, the others name it."""
    per_rank = [_inputs(), _inputs(g=torch.full((2, 12, 3), 0.5)), _inputs()]
    results = dist_workers.run(call_and_catch, (0, 1, 2), method, per_rank, True)
    assert results[1][0] == "ValueError" and "<= 0" in results[1][1]
    for rank in (0, 2):
        assert results[rank][0] == "ValueError" and "rank(s) [1]" in results[rank][1]
    assert all(results[r][2] == 1 for r in range(3))


def _local(T=12, H=4, HKV=4, D=4, g=None):
    return {"q": torch.randn(2, T, H, D), "k": torch.randn(2, T, HKV, D), "v": torch.randn(2, T, HKV, D), "g": g}


REGISTERED_CASES = {
    "ulysses heads not divisible by W": ("linear", "ulysses", 3, "contiguous", [_local()] * 3, "heads divisible by W"),
    "ulysses softmax heads": ("softmax", "ulysses", 3, "contiguous", [_local(H=6, HKV=2)] * 3,
                              "can neither be split"),
    "zigzag odd shard": ("linear", "lasp2", 2, "zigzag", [_local(T=7)] * 2, "has 7 tokens"),
    "zigzag odd shard softmax": ("softmax", "ring", 2, "zigzag", [_local(T=7)] * 2, "has 7 tokens"),
    "GLA gates on ring": ("linear", "ring", 2, "contiguous", [_local(g=-torch.rand(2, 12, 4, 4))] * 2, "not supported"),
    "GLA gates on allgather": ("linear", "allgather", 2, "contiguous", [_local(g=-torch.rand(2, 12, 4, 4))] * 2,
                               "not supported"),
    "GQA heads": ("softmax", "allgather", 2, "contiguous", [_local(H=4, HKV=3)] * 2, "multiple of key/value heads"),
    "unknown layout": ("softmax", "allgather", 2, "striped", [_local()] * 2, "unknown layout"),
}


@pytest.mark.parametrize("case", list(REGISTERED_CASES))
def test_method_rules_raise_before_any_collective(dist_workers, case):
    family, method, world, layout, per_rank, message = REGISTERED_CASES[case]
    results = dist_workers.run(call_and_catch_registered, tuple(range(world)), family, method, per_rank, layout, False)
    for rank in range(world):
        err_type, msg, collectives = results[rank]
        assert err_type == "ValueError" and message in msg, (rank, msg)
        assert collectives == 0


@pytest.mark.parametrize("family,method", [("linear", "ring"), ("linear", "allgather"), ("linear", "ulysses"),
                                           ("softmax", "allgather"), ("softmax", "ring"), ("softmax", "ulysses")])
def test_validate_catches_unequal_shards(dist_workers, family, method):
    """Methods that move whole shards need equal lengths; validate=True says so on every rank."""
    per_rank = [_local(T=12), _local(T=10)]
    results = dist_workers.run(call_and_catch_registered, (0, 1), family, method, per_rank, "contiguous", True)
    for rank in range(2):
        assert results[rank][0] == "ValueError" and "local length differs between ranks" in results[rank][1]
        assert results[rank][2] == 1
