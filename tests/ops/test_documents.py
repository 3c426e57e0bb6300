"""Packed documents (cu_seqlens): every op on a packed row equals each document computed alone
(fp64), outputs, per-document final states and the gradients of every input; bad cu_seqlens
raise a clear error."""
import pytest
import torch

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, naive_recurrent_delta_rule, naive_recurrent_linear_attn
from lasp2.ops.softmax_attn import softmax_attn
from tests.helpers import make_inputs, rel_err
from tests.ops.test_delta_rule import delta_inputs

LENGTHS = (1, 5, 64, 65, 130)  # one token, shorter than a chunk, exactly one, one past, several


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def packed_inputs(decay, lengths=LENGTHS, heads=(2, 4)):
    x = delta_inputs(decay, B=1, T=sum(lengths), Hk=heads[0], Hv=heads[1], seed=5)
    x["s0"] = torch.randn(len(lengths), heads[1], 5, 3, generator=torch.Generator().manual_seed(6),
                          dtype=torch.float64)
    return x


def delta_call(fn, t, **kw):
    return fn(t["q"], t["k"], t["v"], t["beta"], t["g"], scale=0.7, **kw)


def linear_call(fn, t, **kw):
    return fn(t["q"], t["k"], t["v"], t["g"], scale=0.7, **kw)


def _loss_and_grads(o, final, leaves, read_state):
    gen = torch.Generator().manual_seed(9)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    if read_state:
        loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    got = {"o": o.detach(), **{f"d{n}": t.grad for n, t in leaves.items() if t is not None and t.grad is not None}}
    if read_state:
        got["final"] = final.detach()
    return got


def _leaves(x):
    return {n: None if t is None else t.detach().clone().requires_grad_() for n, t in x.items()}


def packed(call, fn, x, cu, use_state, read_state, **kw):
    """One call on the packed row -> outputs, final states, gradients of every leaf."""
    leaves = _leaves(x)
    o, final = call(fn, leaves, initial_state=leaves["s0"] if use_state else None, cu_seqlens=cu, **kw)
    return _loss_and_grads(o, final, leaves, read_state)


def alone(call, fn, x, lengths, use_state, read_state, **kw):
    """Each document through `fn` on its own, joined: the reference."""
    leaves = _leaves(x)
    outputs, finals, start = [], [], 0
    for d, n in enumerate(lengths):
        part = {name: t if t is None or t.dim() == 1 or name == "s0" else t[:, start:start + n]
                for name, t in leaves.items()}
        o, final = call(fn, part, initial_state=leaves["s0"][d:d + 1] if use_state else None, **kw)
        outputs.append(o)
        finals.append(final)
        start += n
    return _loss_and_grads(torch.cat(outputs, dim=1), torch.cat(finals), leaves, read_state)


def assert_close(got, want, tol):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        err = rel_err(got[name].double(), want[name].double())
        assert err <= tol, f"{name}: error {err:.2e} > {tol}"


STATES = {"none": (False, False), "initial": (True, False), "final": (False, True), "both": (True, True)}


@pytest.mark.parametrize("states", list(STATES))
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_packed_delta_rule_equals_each_document_alone(decay, states):
    x = packed_inputs(decay)
    use_state, read_state = STATES[states]
    want = alone(delta_call, naive_recurrent_delta_rule, x, LENGTHS, use_state, read_state)
    cu = offsets(LENGTHS)
    assert_close(packed(delta_call, chunk_delta_rule, x, cu, use_state, read_state, output_final_state=read_state,
                        chunk_size=32), want, 1e-10)
    assert_close(packed(delta_call, naive_recurrent_delta_rule, x, cu, use_state, read_state), want, 1e-10)


def test_packed_delta_rule_plain_heads_and_default_chunks():
    lengths = (70, 3, 60)
    x = packed_inputs("token", lengths, heads=(3, 3))
    x["s0"] = x["s0"][:, :3]
    assert_close(packed(delta_call, chunk_delta_rule, x, offsets(lengths), True, True, output_final_state=True),
                 alone(delta_call, naive_recurrent_delta_rule, x, lengths, True, True), 1e-10)


@pytest.mark.parametrize("states", list(STATES))
@pytest.mark.parametrize("decay", ["none", "head", "token", "channel"])
def test_packed_linear_attention_equals_each_document_alone(decay, states):
    x = make_inputs(decay, B=1, T=sum(LENGTHS), H=2, K=5, V=3, seed=7)
    x["s0"] = torch.randn(len(LENGTHS), 2, 5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    use_state, read_state = STATES[states]
    want = alone(linear_call, naive_recurrent_linear_attn, x, LENGTHS, use_state, read_state)
    cu = offsets(LENGTHS)
    for chunk_size in (16, 64):  # per-channel decay rounds 64 down to a power of two: the same
        assert_close(packed(linear_call, chunk_linear_attn, x, cu, use_state, read_state,
                            output_final_state=read_state, chunk_size=chunk_size), want, 1e-10)
    assert_close(packed(linear_call, naive_recurrent_linear_attn, x, cu, use_state, read_state), want, 1e-10)


def test_packed_bidirectional_linear_attention():
    x = make_inputs("none", B=1, T=sum(LENGTHS), H=2, K=5, V=3, seed=7)
    x["s0"] = torch.randn(len(LENGTHS), 2, 5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = alone(linear_call, naive_recurrent_linear_attn, x, LENGTHS, True, True, causal=False)
    assert_close(packed(linear_call, chunk_linear_attn, x, offsets(LENGTHS), True, True, output_final_state=True,
                        causal=False), want, 1e-10)


def test_strong_gates_and_resets_stay_finite():
    """Resets next to gates of −20, fp32: finite and within 1e-5 of the documents alone."""
    lengths = (3, 40, 1, 20)
    x = make_inputs("channel", B=1, T=sum(lengths), H=2, K=4, V=3, seed=1, strong=True)
    x["s0"] = torch.zeros(len(lengths), 2, 4, 3, dtype=torch.float64)
    want = alone(linear_call, naive_recurrent_linear_attn, x, lengths, False, True)
    low = {n: t.float() for n, t in x.items()}
    got = packed(linear_call, chunk_linear_attn, low, offsets(lengths), False, True, output_final_state=True)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_softmax_attention_equals_each_document_alone(causal):
    gen = torch.Generator().manual_seed(3)
    T = sum(LENGTHS)
    x = {"q": torch.randn(1, T, 4, 6, generator=gen, dtype=torch.float64),
         "k": torch.randn(1, T, 2, 6, generator=gen, dtype=torch.float64),
         "v": torch.randn(1, T, 2, 5, generator=gen, dtype=torch.float64), "s0": torch.zeros(1)}

    def call(fn, t, initial_state=None, **kw):  # softmax attention has no state: a zero stands in
        return fn(t["q"], t["k"], t["v"], causal=causal, scale=0.4, **kw), torch.zeros(1)

    want = alone(call, softmax_attn, x, LENGTHS, False, False)
    assert_close(packed(call, softmax_attn, x, offsets(LENGTHS), False, False), want, 1e-10)


@pytest.mark.parametrize("fn", [naive_recurrent_delta_rule, chunk_delta_rule, naive_recurrent_linear_attn,
                                chunk_linear_attn])
def test_bad_cu_seqlens_names_the_rule(fn):
    x = packed_inputs("none", (4, 4))
    delta = fn in (naive_recurrent_delta_rule, chunk_delta_rule)
    args = (x["q"], x["k"], x["v"], x["beta"], None) if delta else (x["q"], x["k"], x["v"][:, :, :2], None)
    for cu, message in [([0, 4, 8], "must be a torch.Tensor"),
                        (torch.tensor([0, 4, 8], dtype=torch.int32), "int64"),
                        (torch.tensor([0, 4, 7]), "end at the packed length 8"),
                        (torch.tensor([1, 4, 8]), "start at 0"),
                        (torch.tensor([0, 4, 4, 8]), "strictly increasing")]:
        with pytest.raises((TypeError, ValueError), match=message):
            fn(*args, cu_seqlens=cu)
    with pytest.raises(ValueError, match="one packed row"):
        fn(*(torch.cat([t, t]) for t in args[:-1]), None, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="one state per document"):
        fn(*args, cu_seqlens=torch.tensor([0, 4, 8]), initial_state=x["s0"][:1])


def test_half_precision_log_decay_with_resets_stays_finite():
    """An fp16 log decay: the reset (-1e30) lives in the compute dtype, never in fp16 (-inf)."""
    lengths = (5, 11)
    x = make_inputs("token", B=1, T=sum(lengths), H=2, K=4, V=3, seed=2)
    want = alone(linear_call, naive_recurrent_linear_attn, {**x, "s0": torch.zeros(2, 2, 4, 3, dtype=torch.float64)},
                 lengths, False, False)
    for decay in (x["g"].half(), x["g"][0, 0].half()):  # [B, T, H] and [H]
        o, _ = chunk_linear_attn(x["q"].float(), x["k"].float(), x["v"].float(), decay, scale=0.7,
                                 cu_seqlens=offsets(lengths))
        assert torch.isfinite(o).all()
        if decay.dim() == 3:
            assert rel_err(o.double(), want["o"]) < 2e-3  # the decay itself rounded to fp16
