"""torch.compile(fullgraph=True) of the single-device ops: chunk_linear_attn (every decay form,
states in and out, packed documents), chunk_delta_rule (DeltaNet, Gated DeltaNet, KDA, packed),
softmax_attn and causal_conv1d trace without one graph break, forward and backward, under
either device policy (compiled, the state scans are log-depth under both: a loop would
unroll into the graph), and give the eager results (fp32, 1e-5). Traced with the "aot_eager"
backend (Dynamo and AOTAutograd, the parts that break graphs; seconds per op); one case also
through inductor, the default backend, which generates and compiles C++ here (~20 s)."""
import pytest
import torch
import torch.nn.functional as F

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, documents, policy
from lasp2.ops.conv import causal_conv1d
from lasp2.ops.softmax_attn import softmax_attn
from tests.helpers import rel_err

B, T, H, D = 1, 70, 2, 8
DOCS = [0, 20, 21, 70]


def _case(name: str):
    """(fn(*leaves) -> tensor, leaves) for one op and form."""
    gen = torch.Generator().manual_seed(len(name))
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    op, form, *packed = name.split("-")
    cu = documents(torch.tensor(DOCS)) if packed else None
    if op == "linear":
        if form == "states":  # an initial state in, the final state out
            g, s0 = F.logsigmoid(randn(B, T, H) + 2), randn(B, H, D, D)
            return (lambda q, k, v, g, s0: sum(t.sum() for t in chunk_linear_attn(
                q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16))), [q, k, v, g, s0]
        shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, D)}[form]
        g = None if shape is None else F.logsigmoid(randn(*shape) + 2)
        return (lambda q, k, v, g: chunk_linear_attn(q, k, v, g, chunk_size=16, cu_seqlens=cu)[0]), [q, k, v, g]
    if op == "delta":
        g = {"deltanet": None, "gated": F.logsigmoid(randn(B, T, H) + 2),
             "kda": F.logsigmoid(randn(B, T, H, D) + 2)}[form]
        beta = torch.sigmoid(randn(B, T, H))
        return (lambda q, k, v, b, g: chunk_delta_rule(q, F.normalize(k, dim=-1), v, b, g, chunk_size=16,
                                                        cu_seqlens=cu)[0]), [q, k, v, beta, g]
    if op == "softmax":
        return (lambda q, k, v: softmax_attn(q, k, v, cu_seqlens=cu)), [q, k, v]
    return (lambda x, w: causal_conv1d(x, w, cu_seqlens=cu)), [randn(B, T, 3 * D), randn(3 * D, 4)]


def _run(fn, leaves):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.pow(2).sum().backward()
    return [out.detach()] + [t.grad for t in leaves if t is not None]


CASES = ["linear-none", "linear-head", "linear-token", "linear-channel", "linear-states", "linear-token-packed",
         "delta-deltanet", "delta-gated", "delta-kda", "delta-gated-packed", "softmax-causal", "softmax-causal-packed",
         "conv-silu", "conv-silu-packed"]


# the policies differ in tiles and in what the delta rule keeps (compiled scans are log-depth under both)
POLICY_CASES = [(name, "cpu") for name in CASES] + [("linear-channel", "cuda"), ("delta-kda", "cuda"),
                                                      ("delta-gated-packed", "cuda")]


@pytest.mark.parametrize("name,device_policy", POLICY_CASES)
def test_the_ops_compile_without_graph_breaks(name, device_policy):
    torch._dynamo.reset()
    fn, leaves = _case(name)
    with policy(device_policy):
        eager = _run(fn, leaves)
        compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), leaves)
    for want, got in zip(eager, compiled):
        assert rel_err(got, want) < 1e-5


def test_inductor_compiles_an_op():
    torch._dynamo.reset()
    fn, leaves = _case("linear-token-packed")
    eager = _run(fn, leaves)
    compiled = _run(torch.compile(fn, fullgraph=True), leaves)
    for want, got in zip(eager, compiled):
        assert rel_err(got, want) < 1e-5
