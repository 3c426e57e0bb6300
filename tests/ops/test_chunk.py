"""chunk_linear_attn against the fp64 token-by-token recurrence: outputs, states, every gradient."""
import dataclasses

import pytest
import torch

from lasp2.ops import chunk_linear_attn, naive_recurrent_linear_attn, policy
from lasp2.ops.policy import CPU
from tests.helpers import DECAY_FORMS, MatmulOperands, leaf, make_inputs, rel_err


def _run(fn, inputs, s0, do, d_final, causal=True, device="cpu", **kwargs):
    """Forward + backward of o . do + final_state . d_final on `device`; returns outputs and
    input grads, on the CPU."""
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    q, k, v, g = (leaf(to(inputs[n])) for n in "qkvg")
    s0, do, d_final = leaf(to(s0)), to(do), to(d_final)
    o, final = fn(q, k, v, g, initial_state=s0, causal=causal, scale=0.8, **kwargs)
    loss = (o.double() * do).sum()
    if final is not None and d_final is not None:
        loss = loss + (final.double() * d_final).sum()
    loss.backward()
    grads = {n: t.grad.cpu() for n, t in zip("qkvgs", (q, k, v, g, s0)) if t is not None}
    return o.cpu(), None if final is None else final.cpu(), grads


def _compare(inputs, s0, final, tol, causal=True, device="cpu", **kwargs):
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    d_final = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if final else None
    ref_inputs = {n: None if t is None else t.double() for n, t in inputs.items()}
    o_ref, f_ref, g_ref = _run(naive_recurrent_linear_attn, ref_inputs, None if s0 is None else s0.double(), do, d_final, causal)
    o, f, grads = _run(chunk_linear_attn, inputs, s0, do, d_final, causal, device, output_final_state=final, **kwargs)
    assert o.dtype == inputs["q"].dtype and o.shape == o_ref.shape
    errors = {"o": rel_err(o, o_ref)}
    if final:
        errors["final_state"] = rel_err(f, f_ref)
    else:
        assert f is None
    assert grads.keys() == g_ref.keys()
    errors.update({f"d{n}": rel_err(grads[n], g_ref[n]) for n in g_ref})
    for t in grads.values():
        assert torch.isfinite(t).all()
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


POLICIES = ["cpu", "cuda"]  # the CPU's blocked scans and tiles; the GPU's log-depth scans, one tile


@pytest.mark.parametrize("device_policy", POLICIES)
@pytest.mark.parametrize("T", [1, 63, 64, 200])
@pytest.mark.parametrize("kind", DECAY_FORMS)
@pytest.mark.parametrize("with_initial,with_final", [(False, False), (True, True), (True, False), (False, True)])
def test_fp32_matches_fp64_recurrence(kind, T, with_initial, with_final, device, device_policy):
    inputs = make_inputs(kind, T=T, dtype=torch.float32, seed=T)
    s0 = torch.randn(2, 3, 6, 5) if with_initial else None
    with policy(device_policy):
        _compare(inputs, s0, with_final, tol=1e-5, device=device)


@pytest.mark.parametrize("device_policy", POLICIES)
@pytest.mark.parametrize("kind", DECAY_FORMS)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_fp64_exact_for_every_chunk_size(kind, chunk_size, device, device_policy):
    inputs = make_inputs(kind, T=70, seed=chunk_size)
    s0 = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with policy(device_policy):
        _compare(inputs, s0, True, tol=1e-12, device=device, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", DECAY_FORMS)
@pytest.mark.parametrize("chunks_per_tile", [1, 3, 14, 28])
def test_fp64_exact_in_any_tiling(kind, chunks_per_tile):
    """The per-chunk kernels run over cache-sized tiles: runs of a batch row's chunks (1 or 3 of
    its 14, the last run shorter), one whole row, or both rows; every tiling gives the
    recurrence's outputs and gradients."""
    tiles = dataclasses.replace(CPU, tile_values=chunks_per_tile * 3 * 5 * 6)  # H x c x max(c, K, V)
    inputs = make_inputs(kind, T=70, seed=chunks_per_tile)
    s0 = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with policy(tiles):
        _compare(inputs, s0, True, tol=1e-12, chunk_size=5)


@pytest.mark.parametrize("T", [1, 63, 200])
@pytest.mark.parametrize("with_initial", [False, True])
def test_bidirectional(T, with_initial, device):
    inputs = make_inputs("none", T=T, dtype=torch.float32)
    s0 = torch.randn(2, 3, 6, 5) if with_initial else None
    _compare(inputs, s0, True, tol=1e-5, causal=False, device=device)


@pytest.mark.parametrize("device_policy", POLICIES)
@pytest.mark.parametrize("kind", DECAY_FORMS)
def test_strong_decay_is_finite_and_exact(kind, device, device_policy):
    """log decays of -20 (exp = 2e-9) next to mild ones: no inf/nan, still within fp32 tolerance."""
    inputs = make_inputs(kind, T=200, dtype=torch.float32, strong=True)
    with policy(device_policy):
        _compare(inputs, torch.randn(2, 3, 6, 5), True, tol=1e-5, device=device)


def test_uniform_strong_decay_leaves_only_the_diagonal():
    """With log decay -20 on every token, o_t = q_t . k_t v_t to within exp(-20)."""
    inputs = make_inputs("token", T=100, dtype=torch.float32)
    g = torch.full_like(inputs["g"], -20.0)
    o, _ = chunk_linear_attn(inputs["q"], inputs["k"], inputs["v"], g)
    diag = (inputs["q"] * inputs["k"]).sum(-1, keepdim=True) * inputs["v"]
    assert rel_err(o, diag) < 1e-6


# bf16 carries 8 significant bits (relative rounding 2^-9 = 0.2%); outputs and gradients are
# rounded once to bf16 after fp32 accumulation, so 1% relative (in norm) is the stated bound.
BF16_TOL = 1e-2


@pytest.mark.parametrize("device_policy", POLICIES)
@pytest.mark.parametrize("kind", DECAY_FORMS)
def test_bf16_inputs(kind, device, device_policy):
    inputs = make_inputs(kind, T=130, dtype=torch.bfloat16)
    with policy(device_policy):
        errors = _compare(inputs, None, True, tol=BF16_TOL, device=device)
    x = {n: None if t is None else t.to(device) for n, t in inputs.items()}
    o, final = chunk_linear_attn(x["q"], x["k"], x["v"], x["g"], output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert errors["o"] > 0  # the comparison really ran at bf16 precision


def test_head_decay_gradient_is_summed_over_tokens():
    """[H] decay equals the same values expanded to [B, T, H]; its gradient is their sum."""
    inputs = make_inputs("head", T=50)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g_head = leaf(inputs["g"])
    g_tok = leaf(inputs["g"].expand(2, 50, 3))
    o1, _ = chunk_linear_attn(q, k, v, g_head, chunk_size=8)
    o2, _ = chunk_linear_attn(q, k, v, g_tok, chunk_size=8)
    o1.sum().backward()
    o2.sum().backward()
    assert rel_err(o1, o2) < 1e-14
    assert rel_err(g_head.grad, g_tok.grad.sum(dim=(0, 1))) < 1e-12


def test_inputs_are_not_modified():
    inputs = make_inputs("channel", T=40)
    copies = {n: t.clone() for n, t in inputs.items()}
    q, k, v, g = (leaf(inputs[n]) for n in "qkvg")
    do = torch.randn(2, 40, 3, 5, dtype=torch.float64)
    do_copy = do.clone()
    o, _ = chunk_linear_attn(q, k, v, g, scale=0.5)
    o.backward(do)
    assert torch.equal(do, do_copy)
    for n, t in zip("qkvg", (q, k, v, g)):
        assert torch.equal(t.detach(), copies[n])


@pytest.mark.parametrize("kind", DECAY_FORMS)
def test_the_cuda_policy_runs_every_chunk_matmul_in_bf16_for_bf16_inputs(kind):
    """policy("cuda"), bf16 inputs: every batched matmul of the forward and backward takes bf16
    operands (on a GPU: tensor cores with fp32 accumulation; here the same numbers, emulated),
    but for GLA's intra-chunk levels, which stay fp32; the CPU policy multiplies in fp32."""
    inputs = make_inputs(kind, T=130, dtype=torch.bfloat16)
    q, k, v, g = (None if inputs[n] is None else leaf(inputs[n]) for n in "qkvg")
    seen = {}
    for device_policy in ("cpu", "cuda"):
        with policy(device_policy), MatmulOperands() as log:
            o, _ = chunk_linear_attn(q, k, v, g, chunk_size=16)
            o.float().square().sum().backward()
        seen[device_policy] = log.bf16_exact
    if kind == "channel":  # the binary-splitting levels multiply fp32 factors: only the rest is bf16
        assert any(seen["cuda"]) and not all(seen["cuda"])
    else:
        assert all(seen["cuda"]), seen["cuda"]
    assert not all(seen["cpu"])
