"""The device policy: a forced policy holds for a call's backward too, wherever backward() runs."""
import pytest
import torch

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, policy
from tests.helpers import MatmulOperands, leaf, make_inputs
from tests.ops.test_delta_rule import delta_inputs


def _backward_matmuls(forward):
    """Runs forward() under policy("cuda"), its backward outside the block: the backward's matmuls."""
    with policy("cuda"):
        out = forward()
    with MatmulOperands() as log:
        out.float().square().sum().backward()
    return log.calls


@pytest.mark.parametrize("kind", ["none", "token"])
def test_linear_attention_backward_keeps_the_forwards_half_matmuls(kind):
    x = {n: None if t is None else leaf(t) for n, t in make_inputs(kind, T=70, dtype=torch.bfloat16).items()}
    calls = _backward_matmuls(lambda: chunk_linear_attn(x["q"], x["k"], x["v"], x["g"], chunk_size=16)[0])
    assert calls and all(exact for exact, _ in calls)


def test_delta_rule_backward_keeps_the_forwards_tree_scans():
    x = {n: None if t is None else leaf(t.float()) for n, t in delta_inputs("token", T=70).items()}
    calls = _backward_matmuls(lambda: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], chunk_size=8)[0])
    assert any(caller.startswith("scan.py:") for _, caller in calls)
