"""Under autocast the attention ops keep their own precision (fp32 states for bf16 inputs):
results equal the same bf16 inputs without autocast, and the model trains under it."""
import pytest
import torch

from lasp2.model import LINEAR_KINDS, LinearLlama, ModelConfig
from lasp2.ops import chunk_linear_attn
from lasp2.ops.softmax_attn import softmax_attn
from tests.helpers import leaf, make_inputs


@pytest.mark.parametrize("kind", ["none", "token", "channel"])
def test_chunk_op_ignores_autocast(kind):
    x = make_inputs(kind, T=70, dtype=torch.bfloat16)

    def run():
        q, k, v, g = (leaf(x[n]) for n in "qkvg")
        o, state = chunk_linear_attn(q, k, v, g, output_final_state=True)
        o.float().square().sum().backward()
        return [o, state, q.grad, k.grad, v.grad]

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_model_trains_under_autocast(kind):
    """Every variant (q, k and v reach the ops in one dtype though autocast leaves some fp32)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, linear_kind=kind,
                      feature_dim=4, gate_rank=4)
    model = LinearLlama(cfg)
    tokens = torch.randint(0, 64, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_softmax_op_under_autocast():
    q = torch.randn(1, 20, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = softmax_attn(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
