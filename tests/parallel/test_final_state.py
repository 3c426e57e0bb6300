"""output_final_state across ranks (the prefill of generation): every rank's output and the state
after the whole sequence equal the fp64 token-by-token recurrence's, for every state-passing
method, decay form and delta-rule gate, W in {1, 2, 3, 4}, both layouts and a slot table; LASP-2
adds no collective (every rank combines the summaries it gathered), the chains and the doubling
scan one broadcast of the state (their specs' `final_state`); the short convolution's last w−1
inputs come with its gathered tails. Bad calls raise before any collective."""
import pytest
import torch

from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SequenceParallel, count_collectives, shard, slot_table
from tests.helpers import DECAY_FORMS, make_inputs, rel_err
from tests.ops.test_delta_rule import delta_inputs

STATE_PASSING = ["lasp2", "lasp1", "allscan", "logscan"]
T = 48
LAYOUTS = {"table": slot_table([[0, 3], [1, 2]])}


def linear_prefill(group, method, layout, inputs):
    """Every decay form through sp.linear_attn(output_final_state=True) under no_grad ->
    {form: (o, final state, collectives)}."""
    sp = SequenceParallel(group, linear=method, layout=layout, chunk_size=8)
    out = {}
    for form, x in inputs.items():
        g = x["g"] if form == "head" or x["g"] is None else sp.shard(x["g"])
        with torch.no_grad(), count_collectives() as log:
            o, final = sp.linear_attn(sp.shard(x["q"]), sp.shard(x["k"]), sp.shard(x["v"]), g, scale=0.8,
                                      output_final_state=True)
        out[form] = (o, final, log.rows())
    return out


def delta_prefill(group, method, layout, inputs):
    sp = SequenceParallel(group, delta=method, layout=layout, chunk_size=8)
    out = {}
    for decay, x in inputs.items():
        local = {n: None if t is None else sp.shard(t) for n, t in x.items() if n != "s0"}
        with torch.no_grad(), count_collectives() as log:
            o, final = sp.delta_rule(local["q"], local["k"], local["v"], local["beta"], local["g"], scale=0.7,
                                     output_final_state=True)
        out[decay] = (o, final, log.rows())
    return out


def _linear_inputs():
    return {form: make_inputs(form, B=2, T=T, H=3, K=4, V=5, seed=7) for form in DECAY_FORMS}


def _delta_inputs():
    return {decay: delta_inputs(decay, T=T, Hk=2, Hv=4, seed=5) for decay in ("none", "token", "channel")}


def _positions(rank, world, layout, length=T):
    """The global positions of a rank's tokens."""
    from lasp2.parallel.layout import as_layout

    lay = as_layout(layout, world)
    return lay.local_positions(rank, length // lay.n_slots)


def _check(results, references, spec, world, layout):
    """Each rank's output and final state against the recurrence's; its broadcasts the spec's."""
    for rank, per_case in results.items():
        for case, (o, final, calls) in per_case.items():
            want_o, want_final = references[case]
            assert rel_err(o, want_o[:, _positions(rank, world, layout)]) < 1e-10, (rank, case)
            assert rel_err(final, want_final) < 1e-10, (rank, case)
            broadcasts = [c for c in calls if c[0] == "broadcast"]
            assert len(broadcasts) == (len(spec.final_state) if world > 1 else 0), (rank, case, calls)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", STATE_PASSING)
def test_linear_final_state_equals_the_recurrence(dist_workers, method, world, layout):
    from lasp2.ops import naive_recurrent_linear_attn

    inputs = _linear_inputs()
    refs = {form: naive_recurrent_linear_attn(x["q"], x["k"], x["v"], x["g"], scale=0.8) for form, x in inputs.items()}
    results = dist_workers.run(linear_prefill, tuple(range(world)), method, layout, inputs)
    _check(results, refs, LINEAR_METHODS[method], world, layout)
    _same_on_every_rank(results)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("method", STATE_PASSING)
def test_delta_final_state_equals_the_recurrence(dist_workers, method, world, layout):
    from lasp2.ops import naive_recurrent_delta_rule

    inputs = _delta_inputs()
    refs = {d: naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=0.7) for d, x in inputs.items()}
    results = dist_workers.run(delta_prefill, tuple(range(world)), method, layout, inputs)
    _check(results, refs, DELTA_METHODS[method], world, layout)
    _same_on_every_rank(results)


@pytest.mark.parametrize("method", STATE_PASSING)
def test_final_state_over_a_slot_table(dist_workers, method):
    """Two ranks holding slots (0, 3) and (1, 2): the last slot is rank 0's."""
    from lasp2.ops import naive_recurrent_linear_attn

    inputs = {"token": make_inputs("token", B=2, T=T, H=3, K=4, V=5, seed=7)}
    refs = {f: naive_recurrent_linear_attn(x["q"], x["k"], x["v"], x["g"], scale=0.8) for f, x in inputs.items()}
    results = dist_workers.run(linear_prefill, (0, 1), method, LAYOUTS["table"], inputs)
    _check(results, refs, LINEAR_METHODS[method], 2, LAYOUTS["table"])


def _same_on_every_rank(results):
    """The final states are bitwise equal on every rank (decoding then runs the same on each)."""
    first = results[0]
    for per_case in results.values():
        for case, (_, final, _) in per_case.items():
            assert torch.equal(final, first[case][1]), case


def conv_prefill(group, layout, x, weight, bias):
    sp = SequenceParallel(group, layout=layout)
    with count_collectives() as log:
        out, tail = sp.causal_conv1d(sp.shard(x), weight, bias, "silu", output_final_state=True)
    return out, tail, log.count()


@pytest.mark.parametrize("length", [24, 12])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_conv_final_state_is_the_last_inputs(dist_workers, world, layout, length):
    """Slots of 24 down to 2 tokens (w − 1 = 3)."""
    from lasp2.ops.conv import causal_conv1d

    gen = torch.Generator().manual_seed(2)
    x, weight, bias = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((2, length, 6), (6, 4), (6,)))
    want = causal_conv1d(x, weight, bias)
    for rank, (out, tail, calls) in dist_workers.run(conv_prefill, tuple(range(world)), layout, x, weight, bias).items():
        assert torch.equal(tail, x[:, -3:]), rank
        assert calls == (1 if world > 1 else 0), rank  # the halo's all-gather only
        assert rel_err(out, want[:, _positions(rank, world, layout, length)]) < 1e-12


def test_conv_final_state_of_a_short_sequence_pads_with_zeros():
    from lasp2.parallel.conv import causal_conv1d

    x = torch.randn(1, 2, 3, dtype=torch.float64)
    _, tail = causal_conv1d(x, torch.randn(3, 4, dtype=torch.float64), output_final_state=True)
    assert torch.equal(tail, torch.cat([torch.zeros(1, 1, 3, dtype=torch.float64), x], dim=1))


def refused(group, call):
    with count_collectives() as log:
        try:
            call(group)
        except ValueError as exc:
            return str(exc), log.count()
    return None, log.count()


def _with_grad(group):
    x = make_inputs("token", T=T, H=2, K=4, V=4)
    q = shard(x["q"], group).requires_grad_(True)
    SequenceParallel(group).linear_attn(q, shard(x["k"], group), shard(x["v"], group), shard(x["g"], group),
                                        output_final_state=True)


def _ring(group):
    x = make_inputs("none", T=T, H=2, K=4, V=4)
    SequenceParallel(group, linear="ring").linear_attn(shard(x["q"], group), shard(x["k"], group),
                                                       shard(x["v"], group), output_final_state=True)


def _packed(group):
    x = make_inputs("token", B=1, T=T, H=2, K=4, V=4)
    sp = SequenceParallel(group).with_documents(torch.tensor([0, 20, T]))
    with torch.no_grad():
        sp.linear_attn(sp.shard(x["q"]), sp.shard(x["k"]), sp.shard(x["v"]), sp.shard(x["g"]), output_final_state=True)


@pytest.mark.parametrize("call, message", [
    (_with_grad, r"output_final_state=True across ranks is for inference .* under torch.no_grad\(\)"),
    (_ring, r"the linear method 'ring' cannot return the final state .* methods that can: lasp2, lasp1, allscan, "
            r"logscan"),
    (_packed, r"output_final_state=True with cu_seqlens \(packed documents\) is not supported"),
])
def test_bad_final_state_calls_raise_before_any_collective(dist_workers, call, message):
    import re

    for rank, (error, calls) in dist_workers.run(refused, (0, 1), call).items():
        assert error is not None and re.search(message, error), (rank, error)
        assert calls == 0, rank
