"""The chunked delta rule against the token-by-token recurrence (fp64 oracle): outputs, final
states and the gradients of every input, for DeltaNet (no gate), Gated DeltaNet (a gate per
head) and KDA (a gate per key channel), grouped and plain heads."""
import pytest
import torch

from lasp2.ops import chunk_delta_rule, naive_recurrent_delta_rule
from lasp2.ops import policy as device_policy
from tests.helpers import MatmulOperands, rel_err


def delta_inputs(decay, B=2, T=37, Hk=2, Hv=4, K=5, V=3, dtype=torch.float64, seed=0, strong=False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, T, Hk, K)
    k = torch.nn.functional.normalize(randn(B, T, Hk, K), dim=-1)
    v = randn(B, T, Hv, V)
    beta = 2 * torch.rand(B, T, Hv, generator=gen, dtype=torch.float64)
    gate_shape = {"none": None, "token": (B, T, Hv), "channel": (B, T, Hv, K)}[decay]
    g = None
    if gate_shape is not None:
        g = -torch.rand(*gate_shape, generator=gen, dtype=torch.float64)
        if strong:  # every third gate closes almost completely
            g = torch.where(torch.arange(T).view(1, T, *[1] * (len(gate_shape) - 2)) % 3 == 0, g - 20, g)
    s0 = randn(B, Hv, K, V)
    return {n: None if t is None else t.to(dtype) for n, t in dict(q=q, k=k, v=v, beta=beta, g=g, s0=s0).items()}


def run(fn, x, use_state, **kw):
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in x.items()}
    state = leaves["s0"] if use_state else None
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"], scale=0.7, initial_state=state,
                  **kw)
    gen = torch.Generator().manual_seed(9)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    grads = {f"d{n}": t.grad for n, t in leaves.items() if t is not None and (n != "s0" or use_state)}
    return {"o": o.detach(), "final": final.detach(), **grads}


def naive(x, use_state):
    return run(naive_recurrent_delta_rule, x, use_state)


def chunked(x, use_state, chunk_size=16):
    return run(chunk_delta_rule, x, use_state, output_final_state=True, chunk_size=chunk_size)


def assert_close(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        if want[name].abs().max() == 0:  # e.g. the gate's gradient of one token from a zero state
            err = float(got[name].double().abs().max())
        else:
            err = rel_err(got[name].double(), want[name].double())
        assert err <= tol, f"{name}: error {err:.2e} > {tol}"


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize("heads", [(2, 4), (3, 3)], ids=["gva", "plain"])
@pytest.mark.parametrize("T", [1, 63, 64, 200])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_chunk_matches_recurrence_fp64(decay, T, heads, policy):
    """Under either device policy: the CPU's backward keeps the costly chunk terms, the CUDA's
    recomputes them."""
    x = delta_inputs(decay, T=T, Hk=heads[0], Hv=heads[1])
    for use_state in (False, True):
        with device_policy(policy):
            got = chunked(x, use_state, chunk_size=32)
        assert_close(got, naive(x, use_state), 1e-10)


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_chunk_fp32_within_1e5(decay, policy):
    x = delta_inputs(decay, T=100)
    want = naive(x, True)
    with device_policy(policy):
        got = chunked({n: None if t is None else t.float() for n, t in x.items()}, True)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("decay", ["token", "channel"])
def test_strong_gates_stay_finite_and_exact(decay):
    x = delta_inputs(decay, T=70, strong=True)
    got, want = chunked(x, True), naive(x, True)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close(got, want, 1e-10)


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_bf16_inputs_within_a_stated_bound(decay, policy):
    """bf16 inputs, states in fp32: within 2e-2 of the fp64 recurrence on the same bf16 values,
    over 19 chunks, under either policy (the CUDA one also rounds every chunk matmul's operands
    to bf16: measured 0.3-1%, flat in the number of chunks)."""
    x = delta_inputs(decay, T=300)
    low = {n: None if t is None else t.bfloat16() for n, t in x.items()}
    with device_policy(policy):
        got = chunked(low, True)
    want = naive({n: None if t is None else t.double() for n, t in low.items()}, True)
    assert got["o"].dtype == torch.bfloat16 and got["final"].dtype == torch.float32
    for name in want:
        assert rel_err(got[name].double(), want[name]) < 2e-2, name


# The products that are not chunk matmuls: the scans over the chunks' maps (states: fp32) and a
# per-channel gate's three-way scores (a decay factor per channel: not a matmul).
_NOT_CHUNK_MATMULS = ("scan.py:", "delta_kernels.py:_scores", "delta_kernels.py:_channel_scores_grads")


@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_the_cuda_policy_runs_every_chunk_matmul_in_bf16_for_bf16_inputs(decay):
    """policy("cuda"), bf16 inputs: every chunk matmul of the forward and backward takes bf16
    operands (a state or an fp32 factor rounded, as for linear attention); the CPU policy
    multiplies in fp32."""
    low = {n: None if t is None else t.bfloat16() for n, t in delta_inputs(decay, T=70).items()}
    seen = {}
    for policy in ("cpu", "cuda"):
        with device_policy(policy), MatmulOperands() as log:
            chunked(low, True)
        seen[policy] = [(exact, caller) for exact, caller in log.calls if not caller.startswith(_NOT_CHUNK_MATMULS)]
    assert len(seen["cuda"]) >= 20 and all(exact for exact, _ in seen["cuda"]), seen["cuda"]
    assert not all(exact for exact, _ in seen["cpu"])


def test_chunk_size_does_not_change_the_result():
    x = delta_inputs("token", T=50)
    a, b = chunked(x, True, chunk_size=7), chunked(x, True, chunk_size=64)
    assert_close(a, b, 1e-12)


@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_backward_passes_gradcheck(decay):
    """The hand-written backward against finite differences, each output alone and both."""
    x = delta_inputs(decay, B=1, T=11, Hk=1, Hv=2, K=3, V=2)
    names = [n for n in ("q", "k", "v", "beta", "g", "s0") if x[n] is not None]
    leaves = [x[n].clone().requires_grad_() for n in names]

    def fn(*args):
        a = dict(zip(names, args))
        return chunk_delta_rule(a["q"], a["k"], a["v"], a["beta"], a.get("g"), scale=0.7, initial_state=a["s0"],
                                output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradcheck(lambda *args: fn(*args)[0], leaves)
    assert torch.autograd.gradcheck(lambda *args: fn(*args)[1], leaves)


@pytest.mark.parametrize("fn", [naive_recurrent_delta_rule, chunk_delta_rule])
def test_bad_input_names_the_rule(fn):
    x = delta_inputs("token", T=8)
    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
    with pytest.raises(ValueError, match="multiple of the key heads"):
        fn(q, k, v[:, :, :3], beta[:, :, :3], None)
    with pytest.raises(ValueError, match=r"last dim is K"):
        fn(q, k, v, beta, torch.zeros(2, 8, 4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"beta must be \[B, T, Hv\]"):
        fn(q, k, v, beta[:, :, :2], g)
    with pytest.raises(TypeError, match="floating"):
        fn(q, k, v, beta.long(), g)
    kw = {} if fn is naive_recurrent_delta_rule else {"validate": True}
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 2\]"):
        fn(q, k, v, beta + 2.5, g, **kw)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        fn(q, k, v, beta, -g, **kw)


def test_matches_hugging_face_gated_delta_rule():
    """Qwen3-Next's own PyTorch path (transformers, optional) on the same inputs; it scales q by
    K^-1/2 inside and computes in fp32."""
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x = {n: t.float() for n, t in delta_inputs("token", T=100, Hk=3, Hv=3, K=8, V=4).items()}
    want, _ = hf.torch_chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
    got, _ = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=8 ** -0.5)
    assert rel_err(got, want.to(got.dtype)) < 1e-5
