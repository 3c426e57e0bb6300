"""One token at a time (`lasp2.ops.decode`): stepping the recurrences and the short convolution
from a state, token after token, equals the fp64 references over the whole sequence (every
decay form, delta-rule gate, grouped heads), starting from a chunked kernel's final state."""
import pytest
import torch

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, naive_recurrent_delta_rule, naive_recurrent_linear_attn
from lasp2.ops.conv import causal_conv1d
from lasp2.ops.decode import conv_step, delta_rule_step, linear_attn_step
from tests.helpers import DECAY_FORMS, make_inputs, rel_err
from tests.ops.test_delta_rule import delta_inputs

PREFIX = 20  # the chunked kernel's tokens; the rest are stepped


def _token(t, n):
    return None if t is None else (t if t.dim() == 1 else t[:, n:n + 1])


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_linear_steps_continue_the_chunked_kernel(form):
    x = make_inputs(form, B=2, T=29, H=3, K=4, V=5)
    want, want_state = naive_recurrent_linear_attn(x["q"], x["k"], x["v"], x["g"], scale=0.7)
    cut = {n: None if t is None else (t if t.dim() == 1 else t[:, :PREFIX]) for n, t in x.items()}
    outs, state = chunk_linear_attn(cut["q"], cut["k"], cut["v"], cut["g"], scale=0.7, output_final_state=True,
                                    chunk_size=8)
    outs = [outs]
    for n in range(PREFIX, 29):
        o, state = linear_attn_step(x["q"][:, n:n + 1], x["k"][:, n:n + 1], x["v"][:, n:n + 1], _token(x["g"], n),
                                    state, scale=0.7)
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=1), want) < 1e-12
    assert rel_err(state, want_state) < 1e-12


@pytest.mark.parametrize("heads", [(2, 4), (2, 2)], ids=["gva", "plain"])
@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_delta_rule_steps_continue_the_chunked_kernel(decay, heads):
    x = delta_inputs(decay, T=29, Hk=heads[0], Hv=heads[1])
    want, want_state = naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=0.7)
    cut = {n: None if t is None else t[:, :PREFIX] for n, t in x.items() if n != "s0"}
    out, state = chunk_delta_rule(cut["q"], cut["k"], cut["v"], cut["beta"], cut["g"], scale=0.7,
                                  output_final_state=True, chunk_size=8)
    outs = [out]
    for n in range(PREFIX, 29):
        o, state = delta_rule_step(*(None if x[name] is None else x[name][:, n:n + 1] for name in ("q", "k", "v", "beta", "g")),
                                   state, scale=0.7)
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=1), want) < 1e-12
    assert rel_err(state, want_state) < 1e-12


@pytest.mark.parametrize("width", [1, 2, 4])
def test_conv_steps_continue_the_convolution(width):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((2, 12, 6), (6, width), (6,)))
    want = causal_conv1d(x, weight, bias)
    tail = x[:, 4 - (width - 1):4]
    outs = [causal_conv1d(x[:, :4], weight, bias)]
    for n in range(4, 12):
        o, tail = conv_step(x[:, n:n + 1], tail, weight, bias)
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=1), want) < 1e-14
