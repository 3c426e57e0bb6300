"""Method specs: the README's method table is the specs', and a new method added in one file
(here, inside this test: a function and a spec) is taken by the registry, `SequenceParallel`,
the trainer's configuration check and the cost model without any other edit."""
from pathlib import Path

import pytest
import torch

from lasp2.distributed import ConfigError
from lasp2.model import preset
from lasp2.ops import chunk_linear_attn
from lasp2.ops.checks import DECAY_HEAD, DECAY_NONE, DECAY_TOKEN
from lasp2.parallel import LINEAR_METHODS, Comm, MethodSpec, Plan, Problem, SequenceParallel, method_table, register
from lasp2.parallel.collectives import gather_sequence
from lasp2.parallel.inputs import check_linear_call, wire_dtype
from tests.helpers import make_inputs, rel_err
from tests.parallel.cases import count_registered, run_registered, single_device

ROOT = Path(__file__).resolve().parents[2]


def test_readme_method_table_is_the_specs():
    readme = (ROOT / "README.md").read_text()
    assert method_table() in readme, "README's method table differs from the specs; paste:\n" + method_table()


# ---- a toy method, whole in this block --------------------------------------------------------

def gather_everything_linear_attn(q, k, v, log_decay=None, *, scale=None, causal=True, group=None, chunk_size=64,
                                  validate=False, layout="contiguous"):
    """Gathers the whole sequence onto every rank and keeps its own tokens of the single-device op."""
    call = check_linear_call(TOY_SPEC, q, k, v, log_decay, scale=scale, causal=causal, group=group,
                             chunk_size=chunk_size, validate=validate, layout=layout)
    if call.world == 1:
        return chunk_linear_attn(q, k, v, log_decay, scale=call.scale, causal=causal, chunk_size=call.chunk_size)[0]
    dtype = wire_dtype(q, log_decay)
    per_token = call.shape.decay == DECAY_TOKEN
    travelling = [q.to(dtype), k.to(dtype), v.to(dtype)] + ([log_decay.to(dtype)] if per_token else [])
    q_all, k_all, v_all, *g_all = gather_sequence(travelling, group, call.layout)
    o = chunk_linear_attn(q_all, k_all, v_all, g_all[0] if per_token else log_decay, scale=call.scale, causal=causal,
                          chunk_size=call.chunk_size)[0]
    mine = call.layout.local_positions(call.rank, q.shape[1] // call.layout.slots_per_rank, q.device)
    return o[:, mine].to(q.dtype)


TOY_SPEC = MethodSpec(
    name="toy", family="linear", fn=gather_everything_linear_attn, quadratic=False,
    decays=(DECAY_NONE, DECAY_HEAD, DECAY_TOKEN), decay_reason="the toy does not gather per-channel gates",
    plan=Plan(forward=(Comm("all_gather", "B·C·H·(2·K + V + Gt)", precision="input"),),
              backward=(Comm("reduce_scatter", "W·B·C·H·(2·K + V + Gt)", precision="input"),), steps="2"),
    notes="a test's toy",
)


def _with_toy(job):
    def run(group, *args):
        register(TOY_SPEC)
        try:
            return job(group, *args)
        finally:
            LINEAR_METHODS.pop("toy")
    return run


def toy_outputs(group, inputs, do, layout):
    return _with_toy(run_registered)(group, "linear", "toy", inputs, do, layout)


def toy_collectives(group, inputs, layout):
    return _with_toy(count_registered)(group, "linear", "toy", inputs, layout)


def toy_through_sequence_parallel(group, inputs, layout):
    def job(group):
        sp = SequenceParallel(group, linear="toy", layout=layout)
        x = [sp.shard(inputs[n]) for n in ("q", "k", "v", "g")]
        return sp.linear_attn(*x, scale=0.9), sp.positions(inputs["q"].shape[1])
    return _with_toy(job)(group)


@pytest.fixture
def toy_registered():
    register(TOY_SPEC)
    yield TOY_SPEC
    LINEAR_METHODS.pop("toy")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3])
def test_toy_method_is_exact_and_sends_what_its_spec_says(dist_workers, world, layout):
    inputs = make_inputs("token", B=2, T=48, H=2, K=4, V=3, dtype=torch.float64, seed=1)
    do = torch.randn(2, 48, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ranks = tuple(range(world))
    ref = single_device(inputs, do)
    for rank, got in dist_workers.run(toy_outputs, ranks, inputs, do, layout).items():
        for name in ("o", "dq", "dk", "dv", "dg"):
            assert rel_err(got[name], ref[name][:, got["positions"]]) < 1e-10, (rank, name)
    problem = Problem(B=2, N=48, W=world, S=1 if layout == "contiguous" else 2, H=2, K=4, V=3, decay="token",
                      dtype_bytes=8, state_bytes=8)
    for rank, got in dist_workers.run(toy_collectives, ranks, inputs, layout).items():
        assert (got["forward"], got["backward"]) == TOY_SPEC.calls(problem, rank=rank), rank
    for rank, (o, positions) in dist_workers.run(toy_through_sequence_parallel, ranks, inputs, layout).items():
        assert rel_err(o, ref["o"][:, positions]) < 1e-10


def test_toy_method_in_the_trainer_check_and_the_cost_model(toy_registered):
    from lasp2.train import check_config, parse_config
    from lasp2.parallel import cost as costs

    config = parse_config(["--sp", "2", "--sp-linear", "toy", "--seq-len", "64"])
    check_config(config, 1, preset("debug"))  # accepted
    with pytest.raises(ConfigError, match="--sp-linear toy.*'channel' form.*per-channel gates"):
        check_config(config, 1, preset("debug", linear_kind="gla"))
    problem = Problem(B=1, N=4096, W=2, H=8, K=64, V=64)
    assert TOY_SPEC.bytes_per_rank(problem) == 2048 * 8 * (2 * 64 + 64) * 4 * (1 + 2)  # gather + reduce-scatter
    net = costs.Network(1e-5, 1e10, 1e-5, 1e10, ranks_per_node=8)
    predicted = costs.layer_time(TOY_SPEC, problem, net, rate=1e10)
    assert predicted["seconds"] == pytest.approx(predicted["compute_s"] + predicted["comm_s"])  # nothing overlapped
    assert predicted["comm_s"] == pytest.approx(1e-5 + 2048 * 8 * 192 * 4 / 1e10 + 1e-5 + 2 * 2048 * 8 * 192 * 4 / 2 / 1e10)
