"""Every documented bad input raises a clear error naming the value and the rule."""
import pytest
import torch

from lasp2.ops import chunk_linear_attn, naive_recurrent_linear_attn

B, T, H, K, V = 2, 9, 3, 4, 5


def good():
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V))


CASES = [
    ("positive log_decay", dict(log_decay=torch.full((B, T, H), 0.1)), ValueError, "<= 0"),
    ("q/k shape mismatch", dict(k=torch.randn(B, T, H, K + 1)), ValueError, "same shape"),
    ("v length mismatch", dict(v=torch.randn(B, T + 1, H, V)), ValueError, "v must be"),
    ("log_decay shape", dict(log_decay=-torch.rand(B, T, H + 1)), ValueError, "log_decay has shape"),
    ("3-D q", dict(q=torch.randn(B, T, H * K)), ValueError, "4-D"),
    ("integer q", dict(q=torch.ones(B, T, H, K, dtype=torch.int64)), TypeError, "floating"),
    ("integer log_decay", dict(log_decay=torch.zeros(H, dtype=torch.int32)), TypeError, "floating"),
    ("mixed dtypes", dict(v=torch.randn(B, T, H, V, dtype=torch.float64)), TypeError, "one dtype"),
    ("empty", dict(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, V)), ValueError, "empty"),
    ("non-tensor", dict(q=[[1.0]]), TypeError, "torch.Tensor"),
    ("bidirectional decay", dict(log_decay=-torch.rand(H), causal=False), ValueError, "causal=False"),
    ("initial_state shape", dict(initial_state=torch.randn(B, H, V, K)), ValueError, "initial_state must be"),
    ("scale type", dict(scale="1"), TypeError, "scale"),
    ("causal type", dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("fn", [chunk_linear_attn, naive_recurrent_linear_attn], ids=["chunk", "naive"])
@pytest.mark.parametrize("name,change,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(fn, name, change, exc, message):
    kwargs = {**good(), **change}
    if fn is chunk_linear_attn:
        kwargs["validate"] = True  # values (a positive decay) are checked only on request
    with pytest.raises(exc, match=message):
        fn(**kwargs)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attn(**good(), chunk_size=chunk_size)


def test_error_message_names_the_value():
    with pytest.raises(ValueError, match="largest value is 0.25"):
        chunk_linear_attn(**good(), log_decay=torch.full((H,), 0.25), validate=True)
