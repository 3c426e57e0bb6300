"""What the ops keep for their backward (`lasp2.ops.counting.count_memory`: the bytes a forward
leaves allocated beyond its output, as torch's CPU allocator sees them).

Under activation checkpointing (torch.utils.checkpoint, non-reentrant) every op keeps at most
half its inputs' bytes: everything goes through save_for_backward, which checkpointing drops
(the delta rule once kept its chunks on ctx attributes: 3.7x, KDA 7.4x). Without it no fp32
copy of a bf16 input is kept (a bf16 call holds no more than an fp32 one), and what each op
keeps is bounded: linear attention its chunk states only, the delta rule its chunk states and
(CPU policy) the chunk terms that cost matmuls. The sequence-parallel methods alike (LASP-2 at
W = 2: the gathered transitions travel through save_for_backward too)."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, policy
from lasp2.ops.conv import causal_conv1d
from lasp2.ops.counting import count_memory
from lasp2.ops.softmax_attn import softmax_attn

B, T, H, D = 1, 512, 2, 32
OPS = ("none", "head", "token", "channel", "deltanet", "gated_deltanet", "kda", "softmax", "conv")


def op_and_inputs(op, dtype=torch.float32, T=T):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    if op == "softmax":
        return (lambda q, k, v: softmax_attn(q, k, v)), [q, k, v]
    if op == "conv":
        return (lambda x, w: causal_conv1d(x, w)), [randn(B, T, 3 * H * D), randn(3 * H * D, 4)]
    if op in ("none", "head", "token", "channel"):
        shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, D)}[op]
        g = [] if shape is None else [F.logsigmoid(torch.randn(*shape, generator=gen) + 3).to(dtype)]
        return (lambda *x: chunk_linear_attn(*x, chunk_size=32)[0]), [q, k, v, *g]
    beta = torch.rand(B, T, H, generator=gen).to(dtype)
    shape = {"deltanet": None, "gated_deltanet": (B, T, H), "kda": (B, T, H, D)}[op]
    g = [] if shape is None else [(-0.1 * torch.rand(*shape, generator=gen)).to(dtype)]
    return (lambda *x: chunk_delta_rule(*x, scale=D ** -0.5, chunk_size=32)[0]), [q, F.normalize(k, dim=-1), v, beta, *g]


def held(fn, inputs, checkpointed=False):
    """(bytes the forward leaves allocated beyond its output, the inputs' bytes)."""
    leaves = [t.requires_grad_() for t in inputs]
    run = (lambda *x: checkpoint(fn, *x, use_reentrant=False)) if checkpointed else fn
    gc.collect()
    out = None
    with count_memory() as log:
        out = run(*leaves)
    return log.bytes - out.numel() * out.element_size(), sum(t.numel() * t.element_size() for t in inputs)


@pytest.mark.parametrize("op", OPS)
def test_checkpointing_frees_what_every_op_keeps(op):
    fn, inputs = op_and_inputs(op)
    kept, _ = held(fn, inputs)
    freed, size = held(fn, inputs, checkpointed=True)
    assert kept > 0  # the measurement sees what the op keeps
    assert freed <= 0.5 * size, (op, freed / size)


@pytest.mark.parametrize("device_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("op", ["none", "channel", "deltanet", "gated_deltanet", "kda", "conv"])
def test_no_fp32_copy_of_a_bf16_input_is_kept(op, device_policy):
    with policy(device_policy):
        fp32, _ = held(*op_and_inputs(op, torch.float32))
        bf16, _ = held(*op_and_inputs(op, torch.bfloat16))
    assert bf16 <= fp32, (op, bf16, fp32)


# Bytes kept per token and head (fp32, K = V = 32): linear attention keeps its chunk states
# (K·V / c values: 32 at c = 32); the delta rule its chunk states (K·V / L; KDA's chunks are 16
# tokens: 64) and, under the CPU policy, W, Ū, Qe (K, V, K values) and P, the inverse and the
# key scores (L each).
STATES = {"none": 32, "channel": 32, "deltanet": 32, "gated_deltanet": 32, "kda": 64}
COSTLY = {"none": 0, "channel": 0, "deltanet": 3 * D + 3 * 32, "gated_deltanet": 3 * D + 3 * 32, "kda": 3 * D + 3 * 16}


@pytest.mark.parametrize("device_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("op", list(STATES))
def test_what_the_linear_ops_keep_without_checkpointing(op, device_policy):
    with policy(device_policy):
        kept, _ = held(*op_and_inputs(op))
    values = STATES[op] + (COSTLY[op] if device_policy == "cpu" else 0)
    per_token_head = kept / (B * T * H)
    assert per_token_head <= 4 * values + 16, (op, per_token_head, 4 * values)


def sp_held(group, op, checkpointed, T):
    """On this rank: LASP-2's layer call (zigzag) over T tokens, what it keeps beyond its output."""
    from lasp2.parallel import lasp2_delta_rule, lasp2_linear_attn, shard

    fn, inputs = op_and_inputs(op, T=T)
    local = [t if t.dim() == 1 else shard(t, group, "zigzag") for t in inputs]
    method = lasp2_delta_rule if op in ("deltanet", "gated_deltanet", "kda") else lasp2_linear_attn
    call = (lambda *x: method(*x, group=group, layout="zigzag", chunk_size=32,
                              **({"scale": D ** -0.5} if method is lasp2_delta_rule else {})))
    return held(call, local, checkpointed)


@pytest.mark.parametrize("op", ["none", "channel", "gated_deltanet", "kda"])
def test_lasp2_under_checkpointing_keeps_nothing_that_grows_with_the_sequence(dist_workers, op):
    """What stays is a few communication buffers and checkpointing's RNG state: the same at 4x
    the tokens (without checkpointing, the chunk states and saved terms grow 4x)."""
    for checkpointed in (True, False):
        short, long = (dist_workers.run(sp_held, (0, 1), op, checkpointed, n) for n in (2 * T, 8 * T))
        for rank in range(2):
            grown = (long[rank][0] - short[rank][0]) / (long[rank][1] - short[rank][1])  # per input byte added
            if checkpointed:
                assert grown <= 0.05, (rank, grown, short, long)
            else:
                assert grown >= 0.2, (rank, grown)
